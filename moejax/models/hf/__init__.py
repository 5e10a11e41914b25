"""Pretrained MoE families from Hugging Face checkpoints (config.json +
safetensors): Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V2-Lite/V3,
GPT-OSS, Granite-MoE, GLM-4-MoE, JetMoE (and dense Qwen3 / Llama). See
docs/models.md."""

from moejax.models.hf.config import FAMILIES
from moejax.models.hf.config import ModelSpec
from moejax.models.hf.config import UnsupportedConfig
from moejax.models.hf.config import parse_config
from moejax.models.hf.decoder import HFDecoder
from moejax.models.hf.load import CheckpointError
from moejax.models.hf.load import architecture
from moejax.models.hf.load import from_pretrained
from moejax.models.hf.save import save_pretrained
from moejax.models.hf.describe import describe
