"""Teacher -> student: build a smaller student from a teacher, distil, evaluate, fine-tune.

- `student.py`   keep every k-th layer of the teacher, optionally prune MLP width by activation importance
- `modeling.py`  a full-sequence training forward over our model modules; HF-format save
- `data.py`      offline text sources, the held-out split, token windows in a resumable order
- `losses.py`    forward / reverse KL, generalized JSD, cross-entropy on temperature-scaled logits
- `trainer.py`   the distillation loop (AdamW, warm-up + cosine, accumulation, bf16, checkpoints)
- `evaluate.py`  bits per byte, agreement with the teacher, KL, decode speed, cost per 1M tokens
- `finetune.py`  supervised fine-tuning on chat jsonl (full or LoRA, merged on save)
"""
