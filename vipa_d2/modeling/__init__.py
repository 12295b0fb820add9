from .backbone import VIPATimmBackbone
from .text_encoder import TextEncoder, build_tokenizer, resolve_text_encoder_path, tokenize
from .head import VIPA_HEAD_REGISTRY, VIPAHead, build_vipa_head
from .meta_arch import VIPA, no_target_threshold, runtime_options
from .pixel_decoder import VIPA_PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .transformer_decoder import VIPA_TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .veg import VIPA_VEG_REGISTRY, VisualExpressionGenerator
