from .backbone import VIPATimmBackbone
from .text_encoder import TextEncoder, build_tokenizer, resolve_text_encoder_path, tokenize
from .meta_arch import VIPA
from .pixel_decoder import VIPA_PIXEL_DECODER_REGISTRY, build_pixel_decoder
