# Sourced by the scripts and CI: no hub downloads, wandb offline, Ray without usage stats.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export PYTHONUNBUFFERED=1
