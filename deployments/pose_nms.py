"""YOLO11n-pose's post-processing: from the pose head's raw output to each image's detections.

`nms_pose` is one image's (confidence cut, the best `max_candidates`, class-aware NMS, at most
`max_det`); `nms_pose_batch` gives every image of a batch the same answer with a handful of
device round trips per batch instead of several per image (on a GPU each `.cpu()` is a wait for the
device: at batch 64, four per image cost more than the forward). Plain tensor code, no ultralytics.
"""
from __future__ import annotations

from typing import Sequence

def xywh_to_xyxy(boxes):
    out = boxes.clone()
    out[..., 0] = boxes[..., 0] - boxes[..., 2] / 2
    out[..., 1] = boxes[..., 1] - boxes[..., 3] / 2
    out[..., 2] = boxes[..., 0] + boxes[..., 2] / 2
    out[..., 3] = boxes[..., 1] + boxes[..., 3] / 2
    return out


def nms_pose(prediction, num_classes: int, *, conf_threshold: float = 0.25, iou_threshold: float = 0.7,
             max_det: int = 300, max_candidates: int = 30000):
    """NMS for one image's raw pose-head output.

    prediction: [4 + num_classes + 3*K, anchors]: xywh box (input pixels), class scores (already
    sigmoid), then K keypoints as (x, y, conf). Returns (boxes xyxy [N,4], scores [N],
    class ids [N], keypoints [N,K,3]), best score first, at most `max_det`. Class-aware: boxes of
    different classes never suppress each other."""
    import torch
    from torchvision.ops import batched_nms

    p = prediction.float().transpose(0, 1)  # [anchors, channels]
    scores, class_ids = p[:, 4:4 + num_classes].max(dim=1)
    keep = scores > conf_threshold
    p, scores, class_ids = p[keep], scores[keep], class_ids[keep]
    if p.shape[0] > max_candidates:
        top = scores.topk(max_candidates).indices
        p, scores, class_ids = p[top], scores[top], class_ids[top]
    boxes = xywh_to_xyxy(p[:, :4])
    keypoints = p[:, 4 + num_classes:]
    keypoints = keypoints.reshape(keypoints.shape[0], keypoints.shape[1] // 3, 3)
    kept = batched_nms(boxes, scores, class_ids, iou_threshold)[:max_det]  # sorted by score, descending
    if kept.numel() == 0:
        kept = torch.zeros(0, dtype=torch.long, device=p.device)
    return boxes[kept], scores[kept], class_ids[kept], keypoints[kept]


def scale_boxes(boxes, gain: tuple[float, float], pad: tuple[float, float], orig_size: tuple[int, int]):
    """xyxy boxes in letterboxed pixels -> original image pixels, clipped to the image."""
    height, width = orig_size
    out = boxes.clone().float()
    out[:, [0, 2]] = ((out[:, [0, 2]] - pad[0]) / gain[0]).clamp(0, width)
    out[:, [1, 3]] = ((out[:, [1, 3]] - pad[1]) / gain[1]).clamp(0, height)
    return out


def scale_keypoints(keypoints, gain: tuple[float, float], pad: tuple[float, float], orig_size: tuple[int, int]):
    """[N, K, 3] keypoints (x, y, conf) in letterboxed pixels -> original pixels (clipped); conf unchanged."""
    height, width = orig_size
    out = keypoints.clone().float()
    out[..., 0] = ((out[..., 0] - pad[0]) / gain[0]).clamp(0, width)
    out[..., 1] = ((out[..., 1] - pad[1]) / gain[1]).clamp(0, height)
    return out


# Candidates of whole images per NMS call in nms_pose_batch on a GPU: torchvision's CUDA NMS builds
# an n x n overlap mask (4096 boxes: 2 MiB) and reads it back to the CPU once per call, so fewer,
# larger calls wait less. On a CPU the mask is the work (n^2): one image per call there.
NMS_CHUNK_BOXES = 4096


def nms_pose_batch(raw, num_classes: int, conf_thresholds: Sequence[float], *, iou_threshold: float = 0.7,
                   max_det: int = 300, max_candidates: int = 30000, chunk_boxes: int | None = None) -> list:
    """`nms_pose` for every image of a batch: raw [B, 4 + num_classes + 3*K, anchors] on the device
    -> per image (boxes xyxy [N,4], scores [N], class ids [N], keypoints [N,K,3]) as CPU tensors,
    best score first, each image's own confidence threshold (the tuning's worst case has none).

    The same detections as nms_pose per image: each image keeps its `max_candidates` best anchors
    over its threshold; NMS runs on whole images at a time, each image's and class's boxes moved
    apart so that none suppresses another's; the kept rows of the whole batch cross to the CPU in
    one copy."""
    import torch
    from torchvision.ops import nms

    p = raw.float().transpose(1, 2)  # [images, anchors, channels]
    n_images, anchors, channels = p.shape
    if chunk_boxes is None:
        chunk_boxes = NMS_CHUNK_BOXES if p.is_cuda else 1
    if len(conf_thresholds) != n_images:
        raise ValueError(f"{len(conf_thresholds)} confidence thresholds for {n_images} images")
    scores, class_ids = p[..., 4:4 + num_classes].max(dim=-1)
    top_scores, top = scores.topk(min(max_candidates, anchors), dim=1)  # best first, per image
    thresholds = torch.as_tensor(list(conf_thresholds), dtype=top_scores.dtype, device=p.device).view(-1, 1)
    image_of, rank = (top_scores > thresholds).nonzero(as_tuple=True)  # image by image, best first
    anchor = top[image_of, rank]
    rows, cand_scores = p[image_of, anchor], top_scores[image_of, rank]
    cand_classes = class_ids[image_of, anchor]
    boxes = xywh_to_xyxy(rows[:, :4])
    # NMS on chunks of whole images, at most chunk_boxes candidates each (an image with more: alone)
    chunks, start, size = [], 0, 0
    for count in torch.bincount(image_of, minlength=n_images).tolist():
        if size and size + count > chunk_boxes:
            chunks.append((start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        chunks.append((start, start + size))
    kept_parts = []
    for a, b in chunks:
        chunk_boxes_xyxy = boxes[a:b]
        groups = image_of[a:b] * num_classes + cand_classes[a:b]
        groups = (groups - groups.min()).to(chunk_boxes_xyxy.dtype)
        low = chunk_boxes_xyxy.min()
        span = chunk_boxes_xyxy.max() - low + 1
        kept_parts.append(nms(chunk_boxes_xyxy - low + groups[:, None] * span, cand_scores[a:b], iou_threshold) + a)
    kept = torch.cat(kept_parts) if kept_parts else torch.zeros(0, dtype=torch.long, device=p.device)
    n_keypoint_values = channels - 4 - num_classes
    packed = torch.cat([boxes[kept], cand_scores[kept, None], cand_classes[kept, None].float(),
                        image_of[kept, None].float(), rows[kept, 4 + num_classes:]], dim=1).cpu()
    image_col = packed[:, 6].long()
    # NMS gave each chunk's kept boxes best first; a stable sort by image keeps that order within each
    order = torch.sort(image_col, stable=True).indices
    packed, image_col = packed[order], image_col[order]
    per_image = torch.bincount(image_col, minlength=n_images).tolist()
    out, at = [], 0
    for n in per_image:
        part = packed[at:at + min(n, max_det)]
        at += n
        out.append((part[:, :4], part[:, 4], part[:, 5].long(),
                    part[:, 7:].reshape(part.shape[0], n_keypoint_values // 3, 3)))
    return out
