"""PRIMED in a Hugging Face Trainer: the guarded step under gradient accumulation.

A tiny randomly initialised transformers CLIPModel (through mgcl.models.HFCLIP)
trains on a toy task with CE + alpha CKT + beta CMC on reference pairs and the
Dynamic Fisher Guard. Offline, CPU, seconds:

    python examples/hf_trainer_primed.py --steps 20 --accumulate 2 --out /tmp/hf-primed

The Trainer's log (console, log_history.json in --out) carries ce, ckt, cmc,
distill and the guard penalty. Swap in a real model (HFCLIP.from_pretrained),
a real reference set (mgcl.retrieval.Siphon -> refdata.ReferencePairs) and the
task's data for a real run.
"""
import json
import os
import warnings

from _data import arguments, setup
from transformers import CLIPConfig, TrainingArguments

from mgcl.integrations.transformers import PrimedTrainer
from mgcl.models import HFCLIP, WordTokenizer


def tiny_clip(vocabulary):
    tok = WordTokenizer.build(vocabulary, context_length=16)
    cfg = CLIPConfig(text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                      bos_token_id=tok.SOT, eos_token_id=tok.EOT, pad_token_id=tok.PAD),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    return HFCLIP(cfg, tokenizer=tok)


def main():
    args = arguments(__doc__, "hf-primed-out", "gradient_accumulation_steps")

    student, losses, data = setup(tiny_clip)
    targs = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              gradient_accumulation_steps=args.accumulate, learning_rate=1e-4, logging_steps=1,
                              report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = PrimedTrainer(model=student, args=targs, train_dataset=data, losses=losses,
                            guard={"lam": args.lam, "mode": "dfg", "normalize": "mean"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logs = [h for h in trainer.state.log_history if "penalty" in h]
    for h in logs:
        print(f"step {h['step']}: loss {h['loss']:.4f} ce {h['ce']:.4f} ckt {h['ckt']:.4f} cmc {h['cmc']:.4f} "
              f"penalty {h['penalty']:.3g}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log_history.json"), "w") as fh:
        json.dump(trainer.state.log_history, fh, indent=1)
    print(f"wrote {os.path.join(args.out, 'log_history.json')}")


if __name__ == "__main__":
    main()
