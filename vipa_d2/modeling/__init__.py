from .backbone import VIPATimmBackbone
from .text_encoder import TextEncoder, build_tokenizer, resolve_text_encoder_path, tokenize
