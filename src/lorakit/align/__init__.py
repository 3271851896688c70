"""The stages after supervised fine-tuning, end to end: DPO on preference pairs and GRPO on prompts whose
completions the serving engine samples from the adapter being trained (rollouts.py), scored by rewards
(rewards.py). The losses themselves are plain functions in `lorakit.train` (dpo_loss, grpo_loss); this package
wires them to the data pipeline (hf/), the engine (serve/) and the trainer.
"""
