"""The BiasEdit adapter lifecycle in one minute, offline: create, write deltas, save, load, merge.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from biasedit_peft import BiasEditConfig, edit_targets, get_deltas, set_deltas


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=64, vocab_size=256, bos_token_id=0, eos_token_id=0)
    with tempfile.TemporaryDirectory() as workdir:
        GPT2LMHeadModel(config).save_pretrained(f"{workdir}/base")  # a stand-in for a real checkpoint
        base = GPT2LMHeadModel.from_pretrained(f"{workdir}/base").eval()
        ids = torch.randint(0, 256, (1, 12))
        base_logits = base(ids).logits

        model = get_peft_model(base, BiasEditConfig())  # default: mlp.c_proj of the last 3 blocks
        print("edited modules:", list(edit_targets(model)))
        assert torch.equal(model(ids).logits, base_logits), "a fresh adapter is a no-op"

        # A trained BiasEditor computes these (editor.debias); here: small random rank-4 deltas, stored factored.
        deltas = {
            name: (torch.randn(layer.weight_shape[0], 4) * 0.05, torch.randn(4, layer.weight_shape[1]) * 0.05)
            for name, layer in edit_targets(model).items()
        }
        set_deltas(model, deltas)
        edited_logits = model(ids).logits
        print(f"max logit change from the deltas: {(edited_logits - base_logits).abs().max():.4f}")

        model.save_pretrained(f"{workdir}/adapter")
        reloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(f"{workdir}/base").eval(),
                                             f"{workdir}/adapter")
        same = all(torch.equal(get_deltas(model)[n], d) for n, d in get_deltas(reloaded).items())
        print("deltas after save/load bitwise identical:", same)

        merged = model.merge_and_unload()
        print(f"merged model class: {type(merged).__name__}; "
              f"max |merged - adapter| logits = {(merged(ids).logits - edited_logits).abs().max():.2e}")


if __name__ == "__main__":
    main()
