"""Reads every shard a divergen host wrote with pycocotools (and lvis-api, when installed) and
checks each annotation.

usage: check_coco.py DATASET_DIR EXPECTED.json
EXPECTED maps a sample's seq to its instances' masks as row-major foreground pixel indices.
Prints "images N annotations M" and exits non-zero on the first mismatch.
"""
import glob
import json
import os
import sys

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO


def main(root, expected_path):
    with open(expected_path) as f:
        expected = json.load(f)
    images = annotations = 0
    for shard in sorted(glob.glob(os.path.join(root, "shard-*[0-9]"))):
        coco = COCO(os.path.join(shard, "annotations.json"))
        cat_ids = set(coco.getCatIds())
        for img in coco.loadImgs(coco.getImgIds()):
            images += 1
            want = expected[str(img["seq"])]
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])), key=lambda a: a["id"])
            assert len(anns) == len(want), (shard, img["id"], len(anns), len(want))
            assert os.path.exists(os.path.join(shard, "images", img["file_name"])), img["file_name"]
            for ann, pixels in zip(anns, want):
                annotations += 1
                assert ann["category_id"] in cat_ids
                mask = coco.annToMask(ann)
                assert mask.shape == (img["height"], img["width"]), mask.shape
                got = np.flatnonzero(mask.reshape(-1))
                assert np.array_equal(got, np.asarray(pixels, dtype=got.dtype)), (shard, ann["id"])
                rle = coco.annToRLE(ann)
                assert int(mask_util.area(rle)) == ann["area"], (ann["id"], ann["area"])
                assert np.allclose(mask_util.toBbox(rle), ann["bbox"]), (ann["id"], ann["bbox"])
    assert images == len(expected), (images, len(expected))
    print(f"images {images} annotations {annotations}")
    check_lvis(root, expected)


def check_lvis(root, expected):
    try:
        from lvis import LVIS
    except ImportError:
        print("lvis-api: not installed, skipped")
        return
    masks = 0
    for shard in sorted(glob.glob(os.path.join(root, "shard-*[0-9]"))):
        lvis = LVIS(os.path.join(shard, "annotations.json"))
        assert all(c["frequency"] in ("f", "c", "r") for c in lvis.load_cats(None))
        for img in lvis.load_imgs(lvis.get_img_ids()):
            want = expected[str(img["seq"])]
            anns = sorted(lvis.load_anns(lvis.get_ann_ids(img_ids=[img["id"]])), key=lambda a: a["id"])
            for ann, pixels in zip(anns, want):
                got = np.flatnonzero(lvis.ann_to_mask(ann).reshape(-1))
                assert np.array_equal(got, np.asarray(pixels, dtype=got.dtype)), (shard, ann["id"])
                masks += 1
    print(f"lvis-api: {masks} masks equal")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
