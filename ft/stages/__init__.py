"""The training stages, one module each (sft, reward, dpo, rejection, ppo, gatt; ppo_trl: RLOO and GRPO through TRL).

What each stage is (its CLI help, data kind, section, ...) is declared once, in ft/stages/registry.py; running one
as `llama-ft STAGE RECIPE` does is ft/runner.py (`ft.run_stage`). This package file imports nothing.
"""
