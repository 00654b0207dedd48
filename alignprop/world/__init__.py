"""A synthetic world for real offline experiments: a renderer of counted, coloured shapes, a tiny text-to-image
model trained on it, a learned count reward, and exact ground-truth metrics.

It replays the controllability experiment of AlignProp (arXiv 2310.03739, Sec. 5: align the model to produce the
number of objects the prompt asks for) where the truth is known exactly and everything runs on a CPU.
"""
