"""The LLaVA model: loading by `model_type` (one loader for every stage), the probe's adapter, the chat prompt."""
from vrc_dist.model.adapter import KVContext, LlavaAdapter, ModelError, VisualFeatures, given_cache
from vrc_dist.model.chat import chat_prompt, conversation
from vrc_dist.model.loading import MODEL_CLASSES, load_checkpoint, load_llava, resolve_checkpoint, resolve_device_dtype
