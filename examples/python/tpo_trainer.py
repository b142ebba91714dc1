#!/usr/bin/env python3
"""TPO in TRL: a DPOTrainer whose loss is computed by the tpo library.

TPOTrainer runs what the official TPO trainer runs per batch: the policy on the clean images and on
images corrupted by forward diffusion noise (tpo.corrupt.diffusion, step 500 of the sigmoid
schedule), the frozen reference model on both under torch.no_grad(), and the TPO loss with its
self-calibrated token weights (tpo.torch.tpo_loss: exact gradients into both policy passes).
Everything else is TRL's DPOTrainer: data set tokenisation, collation, the optimiser, logging.

The script trains a tiny vision-language model it builds itself (no downloaded weights, no hub):
pictures of coloured squares, captions naming what they show (chosen) or naming a colour that is not
there (rejected). At initialisation the reference is a copy of the policy, so every pair's loss is
ln 2 exactly; the script checks that, trains, and prints the loss and the reward accuracy.

    pip install torch trl . && python examples/python/tpo_trainer.py [--steps 30]

Needs torch, transformers, trl and datasets (not needed by the tpo package itself).
"""

import argparse
import copy
import math
import os
import tempfile

import torch
from torch import nn
from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

import tpo
import tpo.torch

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1),
           "white": (0.95, 0.95, 0.95), "purple": (0.6, 0.1, 0.8)}
WORDS = ["<pad>", "<unk>", "<eos>", "describe", "the", "picture", ":", "a", "and", "square", "squares"] + list(COLOURS)
IMAGE = 16  # pixels a side


# ----------------------------------------------------------------------------------------------
# The tiny model: a patch encoder whose features prefix the text, a GRU, a language-model head.

class TinyVLMConfig(PretrainedConfig):
    model_type = "tiny_tpo_vlm"

    def __init__(self, vocab_size=len(WORDS), hidden_size=48, patch=4, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.patch = vocab_size, hidden_size, patch


class TinyVLM(PreTrainedModel, GenerationMixin):
    config_class = TinyVLMConfig

    def __init__(self, config):
        super().__init__(config)
        h, p = config.hidden_size, config.patch
        self.patches = nn.Linear(3 * p * p, h)
        self.embed = nn.Embedding(config.vocab_size, h)
        self.mixer = nn.GRU(h, h, batch_first=True)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.3)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        p = self.config.patch
        b = input_ids.shape[0]
        patches = pixel_values.unfold(2, p, p).unfold(3, p, p)  # (B, 3, H/p, W/p, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
        image_tokens = torch.tanh(self.patches(patches))
        text = self.embed(input_ids)
        hidden, _ = self.mixer(torch.cat([image_tokens, text], dim=1))
        # Logits at text position t predict token t + 1 (the library applies the causal shift).
        return CausalLMOutput(logits=self.lm_head(hidden[:, image_tokens.shape[1]:]))


# ----------------------------------------------------------------------------------------------
# Data: scenes of coloured squares; the chosen caption names the colours shown, the rejected one
# swaps one of them for a colour that is not in the picture (a hallucination).

def scene(index):
    g = torch.Generator().manual_seed(index)
    names = list(COLOURS)
    shown = [names[i] for i in torch.randperm(len(names), generator=g)[:2].tolist()]
    absent = [c for c in names if c not in shown][int(torch.randint(0, len(names) - 2, (1,), generator=g))]
    return shown, absent


def render(index):
    shown, _ = scene(index)
    image = torch.full((3, IMAGE, IMAGE), 0.05)
    for k, colour in enumerate(shown):
        top, left = 2 + 6 * k, 2 + 5 * k
        image[:, top:top + 6, left:left + 6] = torch.tensor(COLOURS[colour])[:, None, None]
    return image


def dataset(size):
    rows = []
    for index in range(size):
        shown, absent = scene(index)
        rows.append({"prompt": "describe the picture :",
                     "chosen": f" a {shown[0]} square and a {shown[1]} square",
                     "rejected": f" a {shown[0]} square and a {absent} square",
                     "scene": index})
    return Dataset.from_list(rows)


def tokenizer():
    vocab = {word: i for i, word in enumerate(WORDS)}
    model = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


class CollatorWithImages(DataCollatorForPreference):
    """TRL's preference collator (chosen rows, then rejected rows) plus each row's picture."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        images = torch.stack([render(example["scene"]) for example in examples])
        batch["pixel_values"] = torch.cat([images, images])  # a pair's two captions share the picture
        batch["scene"] = torch.tensor([example["scene"] for example in examples])
        return batch


# ----------------------------------------------------------------------------------------------
# The trainer.

class TPOTrainer(DPOTrainer):
    """DPOTrainer with the TPO loss computed by the tpo library.

    noise_step: the diffusion step k of the corruption (official: 500); a: the calibration margin.
    The loss type, beta, label smoothing and the rest come from the DPOConfig, as for DPO.
    """

    def __init__(self, *args, noise_step=500, a=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_step = noise_step
        self.objective = tpo.Objective(method="tpo", loss_type=self.loss_types, loss_weights=self.loss_weights,
                                       beta=self.beta, label_smoothing=self.label_smoothing, a=a,
                                       f_divergence_type=self.f_divergence_type,
                                       f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                                       use_weighting=self.use_weighting, ld_alpha=self.ld_alpha,
                                       threads=torch.get_num_threads())
        self.results = []  # every step's tpo.Result, for the caller

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "scene" not in self._signature_columns:
            self._signature_columns.append("scene")

    def corrupt(self, pixel_values, scenes):
        # Fresh noise every step, the same for a picture's chosen and rejected rows; each picture
        # draws from its own Philox stream, so the noise does not depend on the batch's make-up.
        noisy = torch.empty_like(pixel_values)
        half = len(scenes)
        for row in range(half):
            tpo.corrupt.diffusion(pixel_values[row], step=self.noise_step, seed=self.state.global_step,
                                  stream=int(scenes[row]), out=noisy[row])
        noisy[half:] = noisy[:half]
        return noisy

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)
        clean_images = inputs["pixel_values"]
        noisy_images = self.corrupt(clean_images, inputs["scene"])

        policy = model(input_ids=ids, attention_mask=attention, pixel_values=clean_images).logits
        policy_noisy = model(input_ids=ids, attention_mask=attention, pixel_values=noisy_images).logits
        with torch.no_grad():
            reference = self.ref_model(input_ids=ids, attention_mask=attention, pixel_values=clean_images).logits
            reference_noisy = self.ref_model(input_ids=ids, attention_mask=attention, pixel_values=noisy_images).logits

        # The batch is [chosen rows, rejected rows], as tpo_loss_concatenated reads it.
        loss, result = tpo.torch.tpo_loss_concatenated(policy, policy_noisy, reference, reference_noisy, labels,
                                                       objective=self.objective, return_result=True)
        self.results.append(result)
        for name, value in result.metrics().items():
            self._metrics[mode][name].append(value)
        return (loss, {"logits": policy}) if return_outputs else loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = TinyVLM(TinyVLMConfig())
    reference = copy.deepcopy(model)  # the frozen reference starts as the policy
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, max_steps=args.steps,
                           learning_rate=3e-3, beta=0.1, logging_steps=10, report_to=[], save_strategy="no",
                           use_cpu=True, seed=0, dataloader_num_workers=0, activation_checkpointing=False)
        processing = tokenizer()
        trainer = TPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset(256),
                             processing_class=processing,
                             data_collator=CollatorWithImages(pad_token_id=processing.pad_token_id))
        trainer.train()

    first, last = trainer.results[0], trainer.results[-1]
    print(f"step 1: per-pair losses {first.losses.tolist()} (ln 2 = {math.log(2):.17g})")
    print(f"step {len(trainer.results)}: loss {last.loss:.4f}, reward accuracy {last.reward_accuracy:.2f}, "
          f"margin {last.reward_margin:.4f}")
    if not all(loss == math.log(2) for loss in first.losses):
        raise SystemExit("tpo_trainer: the loss at initialisation is not ln 2 per pair")
    window = max(1, len(trainer.results) // 4)
    early = sum(r.loss for r in trainer.results[:window]) / window
    late = sum(r.loss for r in trainer.results[-window:]) / window
    print(f"mean loss of the first {window} steps {early:.4f}, of the last {window} {late:.4f}")
    if not late < early:
        raise SystemExit("tpo_trainer: the loss did not go down")
    print("tpo_trainer: ok (ln 2 per pair at initialisation, loss down after training)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
