"""maskrcnn shapes: write a synthetic COCO-format dataset of overlapping shapes."""

from __future__ import annotations

from ..checks import COUNT, NON_NEGATIVE_INT, at_least

NAME = "shapes"
HELP = "write a synthetic COCO-format dataset of overlapping, occluding shapes"
ORDER = 40


def add_arguments(p) -> None:
    p.add_argument("out", help="output folder (annotations/, train/, val/)")
    p.add_argument("--train", type=COUNT.flag, default=400, help="number of training images (default 400)")
    p.add_argument("--val", type=COUNT.flag, default=60, help="number of validation images (default 60)")
    p.add_argument("--size", type=at_least(32).flag, default=256,
                   help="shorter image side in pixels, at least 32 (default 256)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT.flag, default=0, help="random seed (default 0)")
    p.add_argument("--videos", type=NON_NEGATIVE_INT.flag, default=0, metavar="N",
                   help="write N videos of moving, occluding, entering and leaving shapes instead "
                        "(OUT/video_NNN.mp4, ground truth with track ids in OUT/video_NNN_gt.json), for tracking")
    p.add_argument("--frames", type=at_least(2).flag, default=100, metavar="N",
                   help="frames per video with --videos, at least 2 (default 100)")
    p.add_argument("--keypoints", action="store_true",
                   help="upright five-pointed figures whose tips are COCO keypoints (head, left/right hand, "
                        "left/right foot), written to annotations/keypoints_{train,val}.json")


def run(args) -> int:
    from ..data.synthetic import make_shapes

    if args.videos:
        from ..data.synthetic_video import make_shape_videos

        for video in make_shape_videos(args.out, num_videos=args.videos, num_frames=args.frames, size=args.size,
                                       seed=args.seed):
            print(f"wrote {video['video']} ({video['frames']} frames, {video['objects']} objects) and "
                  f"{video['ground_truth']}")
        return 0
    summary = make_shapes(args.out, num_train=args.train, num_val=args.val, size=args.size, seed=args.seed,
                          keypoints=args.keypoints)
    print(f"wrote {summary['num_train_images']} train / {summary['num_val_images']} val images "
          f"({summary['num_train_instances']} / {summary['num_val_instances']} instances) to {summary['root']}")
    return 0
