"""Cheap probe of AG-CNN's fusion head on cached features (seconds per setting, CPU).

Loads a run's trained global + local branches (its ``local`` stage), computes Pool5_g and Pool5_l
once per split on the evaluation view (centre crop, no augmentation: a proxy of the fusion stage,
which sees augmented views), then trains only the fusion Linear with Adam under each setting
(init random | branches | global, lr, epochs, feature standardisation) and prints test mean
AUROC of global, local and fusion. docs/methods/agcnn.md records what it measured.

  python scripts/fusion_probe.py --run /tmp/fusion/base --data demo-out/prep -- data.image_size=64
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np
import torch


def _features(lr, ds, split: str, cfg):
    from hpc.loader import EvalLoader

    loader = EvalLoader(ds, cfg.data, ds.indices(split), 32, 0, 1, torch.device("cpu"), seed=cfg.seed,
                        hires=lr.method.needs_hires("local"))
    pg, pl, lg, ll, idx = [], [], [], [], []
    m, model = lr.method, lr.model
    with torch.no_grad():
        for batch in loader:
            keep = batch["valid"].bool()
            x = batch["image"]
            logit_g, feats, pooled_g = model.forward_global(x)
            boxes, _, _ = m.attend(feats, x.shape[-1])
            logit_l, pooled_l = model.forward_local(m.crop(batch, boxes))
            pg.append(pooled_g[keep]); pl.append(pooled_l[keep]); lg.append(logit_g[keep]); ll.append(logit_l[keep])
            idx.append(batch["index"][keep])
    loader.close()
    i = torch.cat(idx).numpy()
    return (torch.cat(pg), torch.cat(pl), torch.cat(lg), torch.cat(ll),
            torch.as_tensor(ds.labels_matrix()[i], dtype=torch.float32))


def _mean_auroc(logits, y, cols) -> float:
    from medattn.metrics import auroc

    v = [auroc(logits[:, j].numpy(), y[:, j].numpy()) for j in cols if 0 < y[:, j].sum() < len(y)]
    return float(np.mean(v))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    from hpc.inference import load_model
    from medattn.data.prepared import PreparedDataset
    from medattn.methods.agcnn import init_fusion_head

    torch.manual_seed(0)
    lr = load_model(a.run, "local", data=a.data, overrides=a.overrides)
    ds = PreparedDataset.open(a.data)
    cols = list(lr.spec.eval_indices)
    tr, va, te = (_features(lr, ds, s, lr.cfg) for s in ("train", "val", "test"))
    out = {"global": _mean_auroc(te[2], te[4], cols), "local": _mean_auroc(te[3], te[4], cols)}
    mu = torch.cat([tr[0], tr[1]], 1).mean(0)
    sd = torch.cat([tr[0], tr[1]], 1).std(0).clamp_min(1e-6)
    for init, lrate, epochs, norm in itertools.product(("random", "branches", "global"), (1e-3, 1e-4),
                                                       (2, 6), (False, True)):
        if norm and init != "random":
            continue  # a head copied from the branches expects unstandardised features
        torch.manual_seed(1)
        init_fusion_head(lr.model, "random")
        f = torch.nn.Linear(lr.model.fusion.in_features, lr.model.fusion.out_features)
        lr.model.fusion = f
        init_fusion_head(lr.model, init)
        opt = torch.optim.Adam(f.parameters(), lr=lrate)
        xtr = torch.cat([tr[0], tr[1]], 1)
        xtr = (xtr - mu) / sd if norm else xtr

        def ev(split):
            x = torch.cat([split[0], split[1]], 1)
            with torch.no_grad():
                return f((x - mu) / sd if norm else x)

        best, best_te = -1.0, float("nan")
        for _ in range(epochs):
            perm = torch.randperm(len(xtr))
            for k in range(0, len(xtr), a.batch):
                b = perm[k:k + a.batch]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(f(xtr[b]), tr[4][b])
                opt.zero_grad(); loss.backward(); opt.step()
            v = _mean_auroc(ev(va), va[4], cols)
            if v > best:  # the stage keeps its best validation epoch
                best, best_te = v, _mean_auroc(ev(te), te[4], cols)
        out[f"fusion init={init} lr={lrate:g} epochs={epochs} std={int(norm)}"] = best_te
    print(json.dumps({k: round(v, 4) for k, v in out.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
