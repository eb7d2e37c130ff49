"""TrainTrain: LoRA / iLECO / Difference / ADDifT training for Stable Diffusion."""
