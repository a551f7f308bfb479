"""Reference IJB scoring: the per-template loops of insightface's eval_ijbc.py and ijb_1n.py.

Written from what those scripts compute (not copied), deliberately in their loop style, so
that bench/ijb_eval.py can time our vectorised evaluate package against it and the tests can
check both give the same numbers. Not used by the package itself.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def image_inputs(features: np.ndarray, faceness: np.ndarray | None) -> np.ndarray:
    """Flip-summed image features times the detector score (eval_ijbc's D1 mode)."""
    feats = np.asarray(features, np.float32)
    if faceness is None:
        return feats.astype(np.float64)
    return feats * np.asarray(faceness, np.float64)[:, np.newaxis]


def template_features(img_feats, templates, medias, choose_templates=None, choose_ids=None):
    """One template at a time: media means, summed, L2-normalised."""
    if choose_templates is None:
        unique_templates = np.unique(templates)
        unique_ids = None
    else:
        unique_templates, first = np.unique(choose_templates, return_index=True)
        unique_ids = choose_ids[first]
    out = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count, template in enumerate(unique_templates):
        (ind_t,) = np.where(templates == template)
        face_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, media_counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for media, count_in_media in zip(unique_medias, media_counts):
            (ind_m,) = np.where(face_medias == media)
            if count_in_media == 1:
                media_feats.append(face_feats[ind_m])
            else:
                media_feats.append(np.mean(face_feats[ind_m], 0, keepdims=True))
        out[count] = np.sum(np.array(media_feats), 0)
    out = out / np.sqrt(np.sum(out ** 2, -1, keepdims=True))
    return out, unique_templates, unique_ids


def verification(template_feats, unique_templates, p1, p2, batch=100_000):
    """Cosine score of each listed pair, gathered in batches."""
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count, template in enumerate(unique_templates):
        template2id[template] = count
    score = np.zeros((len(p1),))
    for start in range(0, len(p1), batch):
        s = np.arange(start, min(start + batch, len(p1)))
        feat1 = template_feats[template2id[p1[s]]]
        feat2 = template_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()
    return score


def sklearn_roc(labels, scores):
    """sklearn.metrics.roc_curve with its defaults (drop_intermediate=True)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    y_score, y_true = scores[order], np.asarray(labels)[order]
    distinct = np.where(np.diff(y_score))[0]
    idx = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[idx]
    fps = 1 + idx - tps
    if len(fps) > 2:
        optimal = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[optimal], tps[optimal]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def tar_at_far(labels, scores):
    fpr, tpr = sklearn_roc(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    result = {}
    for far in FARS:
        _, index = min(zip(abs(fpr - far), range(len(fpr))))
        result[repr(far)] = float(tpr[index])
    return result


def identification(query_feats, gallery_feats, mask):
    """ijb_1n.py's evaluation(): top-1/5/10 and TPIR at FPIR 0.01, 0.1."""
    query_num = query_feats.shape[0]
    similarity = np.dot(query_feats, gallery_feats.T)
    top_inds = np.argsort(-similarity)
    result = {}
    for k in (1, 5, 10):
        correct = 0
        for i in range(query_num):
            if mask[i] in top_inds[i, 0:k]:
                correct += 1
        result[f"top{k}"] = correct / query_num
    fpirs = (0.01, 0.1)
    required = [math.ceil(query_num * x) for x in fpirs]
    pos_sims = []
    for i in range(query_num):
        pos_sims.append(similarity[i, mask[i]])
        similarity[i, mask[i]] = -2.0
    pos_sims = np.array(pos_sims)
    neg_sims = similarity[np.where(similarity > -2.0)]
    neg_sims = heapq.nlargest(max(required), neg_sims)
    result["tpir_at_fpir"] = {repr(f): float(np.sum(pos_sims > neg_sims[n - 1]) / query_num)
                              for f, n in zip(fpirs, required)}
    return result


def gen_mask(query_ids, reg_ids):
    mask = []
    for query_id in query_ids:
        pos = [i for i, x in enumerate(reg_ids) if query_id == x]
        if len(pos) != 1:
            raise RuntimeError(f"subject {query_id} appears {len(pos)} times in the gallery")
        mask.append(pos[0])
    return mask


def evaluate(features, faceness, templates, medias, pairs, labels, g1, g2, probe):
    """All IJB metrics; g1/g2/probe are (template ids, subject ids) per CSV row."""
    img_feats = image_inputs(features, faceness)
    feats, unique_templates, _ = template_features(img_feats, templates, medias)
    scores = verification(feats, unique_templates, pairs[:, 0], pairs[:, 1])
    result = {"tar_at_far": tar_at_far(labels, scores)}
    g1_feats, _, g1_ids = template_features(img_feats, templates, medias, *g1)
    g2_feats, _, g2_ids = template_features(img_feats, templates, medias, *g2)
    probe_feats, _, probe_ids = template_features(img_feats, templates, medias, *probe)
    gallery_feats = np.concatenate([g1_feats, g2_feats])
    mask = gen_mask(probe_ids, np.concatenate([g1_ids, g2_ids]))
    result.update(identification(probe_feats, gallery_feats, mask))
    return result


def read_media_list(path):
    """eval_ijbc.py: image_name template_id media_id, read with pandas."""
    import pandas as pd

    meta = pd.read_csv(path, sep=" ", header=None).values
    return meta[:, 1].astype(np.int64), meta[:, 2].astype(np.int64)


def read_pair_list(path):
    """eval_ijbc.py: template1 template2 label, read with pandas."""
    import pandas as pd

    pairs = pd.read_csv(path, sep=" ", header=None).values
    return pairs[:, :2].astype(np.int64), pairs[:, 2].astype(np.int64)


def read_subject_list(path):
    """ijb_1n.py: TEMPLATE_ID,SUBJECT_ID,... after a header, read with np.loadtxt."""
    meta = np.loadtxt(path, dtype=str, skiprows=1, delimiter=",")
    return meta[:, 0].astype(np.int64), meta[:, 1].astype(np.int64)


def main() -> None:
    """The reference as a whole process: read the IJB-C meta files and .npy features, score,
    write the metrics as JSON (the same keys as ``python -m evaluate ijbc --out``)."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", type=Path, required=True, help="directory with meta/")
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--faceness", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    meta = args.root / "meta"
    templates, medias = read_media_list(meta / "ijbc_face_tid_mid.txt")
    pairs, labels = read_pair_list(meta / "ijbc_template_pair_label.txt")
    g1, g2, probe = (read_subject_list(meta / f"ijbc_1N_{name}.csv")
                     for name in ("gallery_G1", "gallery_G2", "probe_mixed"))
    result = evaluate(np.load(args.features), np.load(args.faceness), templates, medias,
                      pairs, labels, g1, g2, probe)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
