"""
One example as a picture: the frames of the input the VLM sees, the question, the answer's caption,
and frames of the answer video, made by infer.py's own code path.

    python plot_example.py examples/tower.mp4 "I want the green block on the tower next. What should I do?" \
        --model shapes --out assets/shapes_example.png
"""

import argparse
import sys

import common
import data
import infer

parser = argparse.ArgumentParser(description="Draw an input, its question and VANS's answer as one PNG.")
parser.add_argument("video", help="input video or image")
parser.add_argument("question", help="the question")
parser.add_argument("--out", default="example.png", help="the PNG to write")
parser.add_argument("--columns", type=int, default=6, help="frames shown per row")
infer.add_flags(parser)


def draw(vlm_frames, answer_frames, question, caption, columns):
    """Two rows of frames, the input's over the answer's, titled with the question and the caption."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pick = lambda frames: [frames[i] for i in data.uniform_indices(len(frames), columns)]
    h, w = answer_frames.shape[1:3]
    fig, axes = plt.subplots(2, columns, figsize=(columns * 1.5 * w / h, 2 * 1.5 + 0.8), squeeze=False,
                             gridspec_kw=dict(wspace=0.04, hspace=0.3))
    for row, frames, label in ((0, pick(vlm_frames), "input"), (1, pick(answer_frames), "answer")):
        for ax, f in zip(axes[row], frames):
            ax.imshow(f)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(label)
    axes[0][0].set_title(f"Q: {question}", loc="left", fontsize=10)
    axes[1][0].set_title(f"A: {caption}", loc="left", fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.86, bottom=0.02)
    return fig


if __name__ == "__main__":
    args = parser.parse_args()
    try:
        data.probe(args.video)
    except data.VideoError as e:
        infer.fail(e)
    common.check_models(model=args.model, vdm=args.vdm)
    infer.settle_flags(args)
    import torch
    vlm, vdm = infer.load_models(args)
    torch.manual_seed(args.seed)
    (out,), _ = infer.answer(vlm, vdm, [args.video], [args.question], args, torch.Generator().manual_seed(args.seed))
    fig = draw(data.read_vlm_frames(args.video), out["video"], args.question, out["caption"], args.columns)
    fig.savefig(args.out, dpi=100)
    print(f"-> {args.out}", file=sys.stderr)
