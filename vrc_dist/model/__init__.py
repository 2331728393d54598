"""The LLaVA model: loading by `model_type` (one loader for every stage), the probe's adapter, the chat prompt."""
from vrc_dist.model.adapter import (
    LEADING_A,
    KVContext,
    LlavaAdapter,
    ModelError,
    VisualFeatures,
    given_cache,
    leading_a_token_id,
)
from vrc_dist.model.chat import LLAVA_V1_SYSTEM, chat_prompt, conversation, llava_v1_prompt
from vrc_dist.model.loading import MODEL_CLASSES, load_checkpoint, load_llava, resolve_checkpoint, resolve_device_dtype
