"""maskrcnn export: write a model as ONNX, OpenVINO IR or TorchScript for `maskrcnn predict --weights FILE` or other runtimes."""

from __future__ import annotations

NAME = "export"
HELP = ("export a model to ONNX (for ONNX Runtime), OpenVINO IR or TorchScript, with class names and "
        "preprocessing inside")
ORDER = 35


def add_arguments(p) -> None:
    p.add_argument("--weights", required=True, metavar="SRC",
                   help="checkpoint file (ours or a torchvision state dict) or a registered name")
    p.add_argument("--format", choices=("onnx", "openvino", "torchscript"), default="onnx",
                   help="onnx (file must end in .onnx), openvino (an .xml, with its .bin written beside it; "
                        "needs pip install 'maskrcnn[openvino]') or torchscript (default onnx)")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")


def run(args) -> int:
    from ..export.files import export
    from ..weights import load

    model = load(args.weights, device="cpu")
    path = export(model, args.out, args.format)
    size_mb = sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.is_file()) / 1e6
    if args.format != "openvino":
        size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({args.format}, {size_mb:.1f} MB, {model.num_classes} classes); "
          f"run it with: maskrcnn predict --weights {path} ...")
    return 0
