"""A synthetic world for real offline experiments: a renderer of counted, coloured shapes, a tiny text-to-image
model trained on it, a learned count reward, and exact ground-truth metrics.

It replays the controllability experiment of AlignProp (arXiv 2310.03739, Sec. 5: align the model to produce the
number of objects the prompt asks for) where the truth is known exactly and everything runs on a CPU.

| module | what it holds |
| --- | --- |
| `prompts` | captions ("two red circles"), `parse_caption`, `train_captions()`, `heldout_captions()` |
| `render` | deterministic renders of 1-4 circles / squares / triangles in red / green / blue / yellow |
| `metrics` | the exact counter and colour classifier; `world_metrics(images, prompts)` |
| `rewards` | `world_count` (a learned, differentiable count regressor) and `world_color` (weight-free) |
| `train_model` | `alignprop world train-model`: the shipped tiny model (assets/model) and its evaluation |
"""
