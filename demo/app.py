#!/usr/bin/env python
r"""
Web demo: upload an image, type referring expressions (one per line), see the masks, the
relevance maps and the visual tokens each word retrieved.

    pip install -e '.[demo]'             # Gradio, from the repository root
    python demo/app.py --config-file configs/synthetic/vipa_tiny_cpu.yaml \
        MODEL.WEIGHTS output/vipa_tiny_cpu/model_final.pth

It serves on http://127.0.0.1:7860 (``--host`` / ``--port`` to change; binding another
address than loopback exposes the model to your network). The same function is an HTTP
API, ``/segment`` (see the page's "Use via API" link, or ``gradio_client``):
``(image, expressions) -> (overlays, relevance figures, word table, details)``; details is
a list, per expression, of its text, whether it was longer than ``INPUT.MAX_TEXT_LEN``
tokens (``truncated``: the model read only its beginning; the page warns too), confidence,
no-target score, mask area and, per word, the visual tokens it retrieved and the share of
their area on the mask. Uploads are read as ``VIPAPredictor`` reads files.
"""
import argparse
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    import gradio as gr
except ImportError as e:  # the "demo" extra: run as a script, one line instead of a traceback
    if __name__ == "__main__":
        sys.exit(f"app.py: error: the web demo needs Gradio ({e}); install it with pip install -e '.[demo]'")
    raise

from demo import DemoError, add_override_arguments, setup_cfg  # demo/demo.py: this script's folder is sys.path[0]
from vipa_d2.config import add_config_function_option
from vipa_d2.predictor import VIPAPredictor, WeightsError, read_image, validate_expressions
from vipa_d2.utils.visualizer import draw_overlay, draw_relevance_figure, token_cells

# Gradio's own default port; loopback only unless the user says otherwise.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
API_NAME = "segment"
TITLE = "VIPA referring image segmentation"
WORD_TABLE_HEADERS = ["expression", "word", "tokens retrieved", "% of their area on the mask"]


def parse_expressions(text: str) -> List[str]:
    """One expression per non-blank line; gr.Error (shown in the page) when there is none."""
    expressions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not expressions:
        raise gr.Error("Type at least one referring expression (one per line).")
    try:
        return validate_expressions(expressions)
    except ValueError as e:  # a line of no words: the predictor's refusal, in the page
        raise gr.Error(str(e)) from e


def share_on_mask(cue: Dict, mask: np.ndarray) -> float:
    """Percent of the image area of a cue's retrieved tokens that the predicted mask covers."""
    cells = token_cells(cue["tokens"], *mask.shape, cue.get("extent"))
    area = np.count_nonzero(cells)
    return 100.0 * np.count_nonzero(cells & mask) / area if area else 0.0


def describe(text: str, result: Dict, truncated: bool = False) -> Dict:
    """The JSON-able facts of one prediction: what the page's tables and the API return."""
    return {
        "expression": text,
        # Longer than INPUT.MAX_TEXT_LEN tokens: the model read only its beginning.
        "truncated": truncated,
        "confidence": round(float(result["confidence"]), 4),
        "no_target_score": round(float(result["no_target_score"]), 4),
        "mask_pixels": int(np.count_nonzero(result["mask"])),
        # Per linguistic cue ([CLS] = the whole sentence, then the word pieces): how many
        # visual tokens it retrieved and how much of them lies on the answer; empty for a
        # model without VEG.
        "retrieved": [
            {
                "word": cue["word"],
                "tokens": int(np.count_nonzero(cue["tokens"])),
                "on_mask_percent": round(share_on_mask(cue, result["mask"]), 1),
            }
            for cue in result["retrieved"]
        ],
    }


def word_table(details: List[Dict]) -> List[List]:
    """One row per (expression, cue) for the page: the retrieved tokens at a glance."""
    return [
        [d["expression"], cue["word"], cue["tokens"], cue["on_mask_percent"]]
        for d in details
        for cue in d["retrieved"]
    ]


def make_segment(predictor: VIPAPredictor):
    """The page's callback: image file + expressions -> overlays, relevance figures, details."""
    image_format = predictor.input_format

    def segment(image_path: Optional[str], expressions: str) -> Tuple[List, List, List[List], List[Dict]]:
        if image_path is None:
            raise gr.Error("Upload an image first.")
        texts = parse_expressions(expressions)
        # Read as the predictor reads files (EXIF, palettes, refusing 16-bit), in the
        # config's INPUT.FORMAT: Gradio's own conversion made a 16-bit image all white and
        # handed a GIF over as a 2-D array of palette indices.
        try:
            image = read_image(image_path, image_format)
        except (OSError, ValueError) as e:
            raise gr.Error(f"Cannot use this image: {e}") from e
        cut = predictor.cut_expressions(texts)
        if cut:
            gr.Warning(f"Longer than {predictor.max_text_len} tokens, so read only in part: "
                       + "; ".join(repr(texts[i]) for i in cut))
        results = predictor(image, texts)
        overlays = [(draw_overlay(image, r, t, image_format=image_format), t) for t, r in zip(texts, results)]
        figures = [
            (draw_relevance_figure(image, r, t, image_format=image_format), t)
            for t, r in zip(texts, results)
        ]
        details = [describe(t, r, i in cut) for i, (t, r) in enumerate(zip(texts, results))]
        return overlays, figures, word_table(details), details

    return segment


def build_app(predictor: VIPAPredictor) -> gr.Blocks:
    """The Gradio page around ``predictor`` (not launched)."""
    # No usage statistics are sent anywhere: the demo works offline.
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nUpload an image and type one referring expression per line.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, label="Image")
                expressions = gr.Textbox(
                    lines=3, label="Referring expressions (one per line)",
                    placeholder="the red circle\nthe second square from the left",
                )
                run = gr.Button("Segment", variant="primary")
            with gr.Column():
                # PNG, not Gradio's default WebP: the API returns the exact pixels.
                overlays = gr.Gallery(label="Masks", columns=2, object_fit="contain", format="png")
                figures = gr.Gallery(
                    label="Relevance map, then the visual tokens each word retrieved",
                    columns=1, object_fit="contain", format="png",
                )
        words = gr.Dataframe(
            headers=WORD_TABLE_HEADERS, label="Visual tokens each word retrieved", interactive=False
        )
        with gr.Accordion("Details (JSON): confidence, no-target score, retrieved tokens", open=False):
            details = gr.JSON(show_label=False)
        run.click(
            make_segment(predictor),
            inputs=[image, expressions],
            outputs=[overlays, figures, words, details],
            api_name=API_NAME,
        )
    return app


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    add_config_function_option(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to serve on (default: loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on")
    add_override_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        predictor = VIPAPredictor(setup_cfg(args.config_file, list(args.opts) + list(args.trailing_opts),
                                            args.config_function))
    except (DemoError, FileNotFoundError, WeightsError, ValueError) as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 1
    try:
        build_app(predictor).launch(server_name=args.host, server_port=args.port)
    except OSError as e:  # the port taken, an address not of this machine: Gradio's traceback before
        print(f"app.py: error: --host {args.host} --port {args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
