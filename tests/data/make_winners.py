"""Regenerate winners_{train,valid}.jsonl: who won, from a sentence naming both teams.

Both teams appear in every sentence, so the words alone do not tell the winner: it takes the word
order together with the verb's direction ("beat" vs "lost to", active vs passive). A frozen sentence
encoder, built to embed meaning as a bag of mostly order-free features, does badly; LoRA learns it.

    python tests/data/make_winners.py
"""

import json
import random
from pathlib import Path

TEAMS = ["red", "blue"]
WIN = ["beat", "defeated", "thrashed", "edged past", "outplayed", "got the better of", "overcame", "won against"]
LOSE = ["lost to", "fell to", "was beaten by", "was defeated by", "was outplayed by", "went down to", "was edged by"]
WHEN = ["", "on sunday", "in the final", "last night", "after extra time", "at home", "in the rain", "in the cup"]
SCORE = ["", "by two goals", "by a single point", "three to one", "comfortably", "narrowly"]


def sentence(rng: random.Random) -> dict:
    first, second = rng.sample(TEAMS, 2)
    if rng.random() < 0.5:
        verb, winner = rng.choice(WIN), first
    else:
        verb, winner = rng.choice(LOSE), second
    extras = [x for x in (rng.choice(SCORE), rng.choice(WHEN)) if x]
    rng.shuffle(extras)
    text = " ".join([f"the {first} team", verb, f"the {second} team", *extras])
    return {"text": text, "label": winner}


def main() -> None:
    rng = random.Random(20241129)
    seen, rows = set(), []
    while len(rows) < 400:
        row = sentence(rng)
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    here = Path(__file__).parent
    for name, part in (("winners_train.jsonl", rows[:300]), ("winners_valid.jsonl", rows[300:])):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


if __name__ == "__main__":
    main()
