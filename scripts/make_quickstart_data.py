#!/usr/bin/env python
"""Generate the quickstart dataset: ``configs/data/quickstart.jsonl`` (~300 KB, deterministic).

Short generated stories about villagers, their trades and errands, from a small grammar with a
fixed seed: varied enough that a model must learn spelling, word order and agreement, regular
enough that a tiny model visibly learns it in a few hundred steps. Each line is ``{"text": ...}``.

    python scripts/make_quickstart_data.py            # rewrites configs/data/quickstart.jsonl
    python scripts/make_quickstart_data.py --n 200 --out /tmp/small.jsonl
"""

import argparse
import json
import random
from pathlib import Path

NAMES = [
    "Mira",
    "Tomas",
    "Ada",
    "Ben",
    "Lena",
    "Oskar",
    "Nina",
    "Hugo",
    "Ivy",
    "Felix",
    "Rosa",
    "Karl",
    "Elsa",
    "Jonah",
    "Greta",
    "Paul",
]
SHE = {"Mira", "Ada", "Lena", "Nina", "Ivy", "Rosa", "Elsa", "Greta"}
TRADES = {
    "baker": ("bread", "the bakery", "flour"),
    "smith": ("horseshoes", "the forge", "iron"),
    "weaver": ("blankets", "the workshop", "wool"),
    "farmer": ("apples", "the orchard", "seeds"),
    "fisher": ("trout", "the river", "nets"),
    "potter": ("bowls", "the kiln", "clay"),
    "carpenter": ("chairs", "the mill", "timber"),
    "miller": ("flour", "the mill", "grain"),
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEATHER = [
    "it was raining",
    "the sun was warm",
    "a cold wind blew",
    "fog covered the hills",
    "snow fell softly",
    "the sky was clear",
]
PLACES = ["the market", "the harbor", "the old bridge", "the town square", "the inn", "the chapel", "the green"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "ten", "twelve"]
COLORS = ["red", "green", "blue", "yellow", "brown", "white"]
GOODS = ["apples", "candles", "eggs", "onions", "ribbons", "cheeses", "pears", "buttons"]
FEELINGS = ["happy", "tired", "proud", "worried", "hungry", "curious", "calm"]
ENDINGS = [
    "{Pro} went home and slept well.",
    "That night {pro} told the story to {friend}.",
    "{Pro} promised to come back the next {day2}.",
    "By evening the {product} were all sold.",
    "{Pro} counted the coins twice and smiled.",
]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    pro, pos = ("she", "her") if name in SHE else ("he", "his")
    trade = rng.choice(sorted(TRADES))
    product, workplace, material = TRADES[trade]
    friend = rng.choice([n for n in NAMES if n != name])
    day, day2 = rng.sample(DAYS, 2)
    n1, n2 = rng.sample(NUMBERS, 2)
    color, good, place = rng.choice(COLORS), rng.choice(GOODS), rng.choice(PLACES)
    feeling = rng.choice(FEELINGS)
    sentences = [
        f"{name} the {trade} woke early on {day}, and {rng.choice(WEATHER)}.",
        f"{cap(pro)} walked from {workplace} to {place} with {n1} baskets of {product}.",
        f"There {pro} met {friend}, who wanted {n2} {color} {good}.",
    ]
    if rng.random() < 0.5:
        sentences.append(f'"We need more {material}," said {friend}, and {name} nodded.')
    if rng.random() < 0.5:
        sentences.append(f"{name} traded {pos} {product} for {n2} {good} and felt {feeling}.")
    else:
        sentences.append(f"{friend} paid {n2} coins for the {product}, and {name} felt {feeling}.")
    sentences.append(rng.choice(ENDINGS).format(Pro=cap(pro), pro=pro, friend=friend, day2=day2, product=product))
    return " ".join(sentences)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1200, help="number of stories")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "configs" / "data" / "quickstart.jsonl"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(args.n):
            f.write(json.dumps({"text": story(rng)}) + "\n")
    print(f"wrote {args.n} stories, {out.stat().st_size / 1024:.0f} KB -> {out}")


if __name__ == "__main__":
    main()
