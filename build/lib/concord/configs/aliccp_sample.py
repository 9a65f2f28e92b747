"""Writes a tiny made-up CSV in the layout of Ali-CCP (Alibaba's click + conversion log): one row per
impression with user, item and context fields, a click label and a purchase label.

    python configs/aliccp_sample.py runs/aliccp/raw/sample.csv [--rows 20000] [--seed 0]

The values are synthetic (latent user/item factors drive both labels; purchases need a click), so
the path raw CSV -> ``concord convert --config configs/aliccp.yaml`` -> ``concord train`` can be
run and tested anywhere. It is not the public data set, only its shape.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
from pathlib import Path

import numpy as np

COLUMNS = [
    "sample_id", "time", "user_id", "user_gender", "user_age", "item_id", "item_category", "item_brand",
    "shop_id", "item_tags", "price", "user_clicks_7d", "click", "purchase",
]


def write_sample(path: Path, rows: int = 20_000, seed: int = 0, days: int = 8) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items, n_tags, dim = 1500, 800, 60, 4
    user_vec, item_vec = rng.normal(size=(n_users, dim)), rng.normal(size=(n_items, dim))
    buy_vec = rng.normal(size=dim)
    gender, age = rng.integers(0, 2, n_users), rng.integers(1, 8, n_users)
    category = rng.integers(0, 40, n_items)
    brand, shop = rng.integers(0, 120, n_items), rng.integers(0, 200, n_items)
    base_price = np.exp(rng.normal(3.5, 1.0, n_items))
    tags = [sorted(set(rng.integers(0, n_tags, rng.integers(1, 4)).tolist())) for _ in range(n_items)]
    # Zipf-like popularity, as in real logs: a few users and items make most impressions.
    users = np.minimum(rng.zipf(1.3, rows), n_users) - 1
    items = np.minimum(rng.zipf(1.2, rows), n_items) - 1
    start = dt.datetime(2026, 1, 1)
    seconds = np.sort(rng.uniform(0, days * 86_400, rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for i in range(rows):
            u, v = users[i], items[i]
            affinity = float(user_vec[u] @ item_vec[v]) / np.sqrt(dim)
            price = base_price[v] * rng.uniform(0.8, 1.2)
            click = rng.random() < 1 / (1 + np.exp(-(1.5 * affinity - 1.6)))
            buy_logit = float(user_vec[u] @ buy_vec) / np.sqrt(dim) + affinity - 0.4 * np.log1p(price) + 0.5
            purchase = click and rng.random() < 1 / (1 + np.exp(-buy_logit))
            clicks_7d = "" if rng.random() < 0.1 else int(rng.poisson(3 + 2 * max(affinity, 0)))  # 10% missing
            out.writerow([
                i, (start + dt.timedelta(seconds=float(seconds[i]))).isoformat(timespec="seconds"),
                f"u{u}", "MF"[gender[u]], age[u], f"i{v}", f"c{category[v]}", f"b{brand[v]}", f"s{shop[v]}",
                "|".join(f"t{t}" for t in tags[v]), f"{price:.2f}", clicks_7d, int(click), int(purchase),
            ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write_sample(args.path, args.rows, args.seed)
    print(f"wrote {args.rows:,} rows to {args.path}")


if __name__ == "__main__":
    main()
