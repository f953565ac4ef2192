"""Write the bundled sample datasets, deterministically: python assets/make_samples.py

Every sample is generated from small word banks and templates with a fixed seed, so the answers are correct
by construction (sums are computed, sorted lists are sorted, labels follow the sentences chosen) and the
files are identical on every run. No downloads. One file per supported format, plus an identity set that
teaches SmolLM2-135M to call itself Quill.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

ADJECTIVES = ["quiet", "busy", "old", "small", "bright", "narrow", "green", "crowded", "windy", "sunny", "tidy",
              "muddy"]
NOUNS = ["baker", "cat", "teacher", "farmer", "river", "train", "market", "child", "gardener", "dog", "sailor", "robot"]
VERBS = ["watched", "followed", "painted", "visited", "passed", "helped", "found", "carried", "greeted", "counted"]
OBJECTS = ["bridge", "lantern", "basket", "letter", "boat", "garden", "clock", "window", "kite", "map", "bench"]
PLACES = ["near the station", "by the old mill", "in the square", "after lunch", "before sunrise", "at the harbour",
          "on the hill", "behind the library", "during the storm", "next to the school"]
ANIMALS = {  # name: (class, diet, habitat)
    "cow": ("mammal", "herbivore", "farms and grasslands"),
    "lion": ("mammal", "carnivore", "African savannas"),
    "eagle": ("bird", "carnivore", "mountains and open country"),
    "penguin": ("bird", "carnivore", "cold southern coasts"),
    "frog": ("amphibian", "carnivore", "ponds and wetlands"),
    "salmon": ("fish", "carnivore", "rivers and the sea"),
    "rabbit": ("mammal", "herbivore", "meadows and woodland edges"),
    "tortoise": ("reptile", "herbivore", "dry grasslands and scrub"),
    "owl": ("bird", "carnivore", "woods and farmland"),
    "horse": ("mammal", "herbivore", "grasslands and farms"),
    "shark": ("fish", "carnivore", "oceans"),
    "bee": ("insect", "herbivore", "gardens and meadows"),
}
FRUITS = ["apples", "pears", "plums", "cherries", "grapes", "lemons", "oranges", "peaches", "melons", "figs", "kiwis",
          "bananas", "apricots", "limes", "mangoes"]
CAPITALS = {  # country: (capital, continent)
    "France": ("Paris", "Europe"), "Germany": ("Berlin", "Europe"), "Italy": ("Rome", "Europe"),
    "Spain": ("Madrid", "Europe"), "Portugal": ("Lisbon", "Europe"), "Norway": ("Oslo", "Europe"),
    "Sweden": ("Stockholm", "Europe"), "Finland": ("Helsinki", "Europe"), "Poland": ("Warsaw", "Europe"),
    "Austria": ("Vienna", "Europe"), "Hungary": ("Budapest", "Europe"), "Greece": ("Athens", "Europe"),
    "Ireland": ("Dublin", "Europe"), "Denmark": ("Copenhagen", "Europe"), "Japan": ("Tokyo", "Asia"),
    "South Korea": ("Seoul", "Asia"), "Vietnam": ("Hanoi", "Asia"), "Thailand": ("Bangkok", "Asia"),
    "India": ("New Delhi", "Asia"), "Egypt": ("Cairo", "Africa"), "Kenya": ("Nairobi", "Africa"),
    "Ghana": ("Accra", "Africa"), "Morocco": ("Rabat", "Africa"), "Nigeria": ("Abuja", "Africa"),
    "Canada": ("Ottawa", "North America"), "Mexico": ("Mexico City", "North America"),
    "Cuba": ("Havana", "North America"), "Peru": ("Lima", "South America"), "Chile": ("Santiago", "South America"),
    "Argentina": ("Buenos Aires", "South America"), "Colombia": ("Bogotá", "South America"),
    "Australia": ("Canberra", "Oceania"), "New Zealand": ("Wellington", "Oceania"),
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["garden", "window", "library", "pencil", "orange", "mountain", "keyboard", "umbrella", "sandwich", "river",
         "elephant", "notebook", "bicycle", "kitchen", "holiday", "planet", "butterfly", "candle", "harbour", "tomato"]


def sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(OBJECTS)} "
            f"{rng.choice(PLACES)}.")


def paragraph(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(lo, hi)))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------------------------------------------


def instruction_rows(n: int = 240) -> list[dict]:
    rng = random.Random(1)
    rows = []
    for i in range(n):
        task = i % 9
        if task == 0:
            nums = [rng.randint(1, 999) for _ in range(rng.randint(3, 40))]
            rows.append({"instruction": "Sort these numbers in ascending order.", "input": ", ".join(map(str, nums)),
                         "output": ", ".join(map(str, sorted(nums)))})
        elif task == 1:
            words = sentence(rng).rstrip(".").split() + paragraph(rng, 0, 2).replace(".", "").split()
            rows.append({"instruction": "Reverse the order of the words in this sentence.", "input": " ".join(words),
                         "output": " ".join(reversed(words))})
        elif task == 2:
            text = paragraph(rng, 1, 3)
            rows.append({"instruction": "Rewrite the text in capital letters.", "input": text, "output": text.upper()})
        elif task == 3:
            text = paragraph(rng, 1, 10)
            rows.append({"instruction": "Count the words in the text.", "input": text,
                         "output": f"The text has {len(text.split())} words."})
        elif task == 4:
            nums = [rng.randint(1, 99) for _ in range(rng.randint(2, 25))]
            rows.append({"instruction": "Add up these numbers.", "input": " + ".join(map(str, nums)),
                         "output": f"The sum is {sum(nums)}."})
        elif task == 5:
            c = rng.randrange(-40, 105, 5)
            f = c * 9 // 5 + 32
            rows.append({"instruction": f"Convert {c} °C to Fahrenheit.", "input": "",
                         "output": f"{c} °C is {f} °F, because °F = °C × 9/5 + 32 = {c} × 9/5 + 32 = {f}."})
        elif task == 6:
            items = rng.sample(FRUITS, rng.randint(2, 12))
            rows.append({"instruction": "Turn this comma-separated list into a bulleted list.",
                         "input": ", ".join(items), "output": "\n".join(f"- {x}" for x in items)})
        elif task == 7:
            nums = [rng.randint(1, 200) for _ in range(rng.randint(4, 30))]
            even = [x for x in nums if x % 2 == 0]
            out = ", ".join(map(str, even)) if even else "There are no even numbers in the list."
            rows.append({"instruction": "List the even numbers, keeping their order.",
                         "input": ", ".join(map(str, nums)), "output": out})
        else:
            animal = rng.choice(sorted(ANIMALS))
            kind, diet, habitat = ANIMALS[animal]
            rows.append({"instruction": f"Write a short fact sheet about the {animal}.", "input": "",
                         "output": f"Animal: {animal}\nClass: {kind}\nDiet: {diet}\nHabitat: {habitat}\n\n"
                                   f"The {animal} is a {kind}. It is a {diet} and lives in {habitat}."})
    return rows


def conversation_rows(n: int = 220) -> list[dict]:
    rng = random.Random(2)
    rows = []
    for i in range(n):
        msgs = []
        if i % 4 == 0:
            msgs.append({"role": "system", "content": "You are a concise maths tutor. Show the calculation."})
        kind = i % 3
        if kind == 0:  # arithmetic chain
            value = rng.randint(2, 30)
            b = rng.randint(2, 12)
            msgs.append({"role": "user", "content": f"What is {value} times {b}?"})
            value, prev = value * b, value
            msgs.append({"role": "assistant", "content": f"{prev} × {b} = {value}."})
            for _ in range(rng.randint(0, 4)):
                k = rng.randint(1, 50)
                if rng.random() < 0.5:
                    msgs.append({"role": "user", "content": f"And if I add {k} to that?"})
                    msgs.append({"role": "assistant", "content": f"{value} + {k} = {value + k}."})
                    value += k
                else:
                    msgs.append({"role": "user", "content": f"Now subtract {k}."})
                    msgs.append({"role": "assistant", "content": f"{value} − {k} = {value - k}."})
                    value -= k
        elif kind == 1:  # unit conversions
            metres = rng.randint(1, 90) / 2
            msgs.append({"role": "user", "content": f"How many centimetres are in {metres:g} metres?"})
            msgs.append({"role": "assistant", "content": f"{metres:g} m × 100 = {metres * 100:g} cm."})
            for _ in range(rng.randint(0, 3)):
                unit, factor = rng.choice([("millimetres", 1000), ("kilometres", 0.001), ("decimetres", 10)])
                msgs.append({"role": "user", "content": f"And in {unit}?"})
                answer = f"{metres:g} m × {factor:g} = {metres * factor:g} {unit}."
                msgs.append({"role": "assistant", "content": answer})
        else:  # spelling and counting
            word = rng.choice(WORDS)
            msgs.append({"role": "user", "content": f"Can you spell '{word}' backwards?"})
            msgs.append({"role": "assistant", "content": f"'{word}' backwards is '{word[::-1]}'."})
            if rng.random() < 0.7:
                msgs.append({"role": "user", "content": "How many letters does it have?"})
                msgs.append({"role": "assistant", "content": f"'{word}' has {len(word)} letters."})
            if rng.random() < 0.5:
                vowels = sum(ch in "aeiou" for ch in word)
                msgs.append({"role": "user", "content": "And how many of them are vowels?"})
                msgs.append({"role": "assistant", "content": f"{vowels} of them are vowels: "
                             f"{', '.join(ch for ch in word if ch in 'aeiou')}."})
        rows.append({"messages": msgs})
    return rows


def sharegpt_rows(n: int = 210) -> list[dict]:
    rng = random.Random(3)
    countries = sorted(CAPITALS)
    rows = []
    for i in range(n):
        conv = []
        if i % 5 == 0:
            conv.append({"from": "system", "value": "You answer geography questions in one sentence."})
        picks = rng.sample(countries, rng.randint(1, 5))
        for j, country in enumerate(picks):
            capital, continent = CAPITALS[country]
            ask = f"What is the capital of {country}?" if j == 0 else rng.choice(
                [f"And {country}?", f"What about {country}?", f"Which city is the capital of {country}?"])
            conv.append({"from": "human", "value": ask})
            conv.append({"from": "gpt", "value": f"The capital of {country} is {capital}."})
            if rng.random() < 0.3:
                conv.append({"from": "human", "value": "Which continent is it in?"})
                conv.append({"from": "gpt", "value": f"{country} is in {continent}."})
        if len(picks) > 1 and rng.random() < 0.4:
            names = [CAPITALS[c][0] for c in picks]
            conv.append({"from": "human", "value": "Please list all the capitals you mentioned."})
            conv.append({"from": "gpt", "value": f"I mentioned {join_list(names)}."})
        rows.append({"conversations": conv})
    return rows


def qa_rows(n: int = 230) -> list[dict]:
    rng = random.Random(4)
    rows = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            d = rng.randrange(7)
            k = rng.randint(1, 20)
            weeks, days = divmod(k, 7)
            split = "" if weeks == 0 else (
                f"{k} days is {plural(weeks, 'week')}" + (f" and {plural(days, 'day')}" if days else "") + ", so ")
            answer = f"{split}it will be {DAYS[(d + k) % 7]}."
            rows.append({"question": f"If today is {DAYS[d]}, what day will it be in {plural(k, 'day')}?",
                         "answer": answer[0].upper() + answer[1:]})
        elif kind == 1:
            word = rng.choice(WORDS)
            rows.append({"question": f"How many letters are in the word '{word}'?",
                         "answer": f"The word '{word}' has {len(word)} letters."})
        elif kind == 2:
            m = rng.randrange(12)
            rows.append({"question": f"Which month comes after {MONTHS[m]}?", "answer": f"{MONTHS[(m + 1) % 12]}."})
        elif kind == 3:
            a, b, price = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 12)
            fruit = rng.choice(FRUITS)
            total = a * b
            rows.append({
                "question": f"A shop packs {fruit} in boxes of {b}. Sam buys {a} boxes, and each of the {fruit} "
                            f"costs {price} cents. How much does Sam pay?",
                "answer": f"Sam buys {a} × {b} = {total} {fruit}. At {price} cents each that is {total} × {price} = "
                          f"{total * price} cents, or {total * price / 100:.2f} euros.",
            })
        elif kind == 4:
            country = rng.choice(sorted(CAPITALS))
            rows.append({"question": f"What is the capital of {country}?", "answer": CAPITALS[country][0] + "."})
        else:
            nums = [rng.randint(1, 50) for _ in range(rng.randint(2, 12))]
            steps = []
            total = 0
            for x in nums:
                steps.append(f"{total} + {x} = {total + x}")
                total += x
            rows.append({"question": f"What is the total of {join_list([str(x) for x in nums])}?",
                         "answer": "Adding one at a time: " + "; ".join(steps) + f". The total is {total}."})
    return rows


POSITIVE = ["I love this {p}.", "The {p} works perfectly.", "Great value for the money.", "Delivery was fast.",
            "It feels solid and well made.", "I would happily buy this {p} again.", "Setup took two minutes.",
            "My whole family enjoys it.", "The battery lasts for days.", "Customer service was friendly and quick.",
            "Exactly as described.", "Five stars from me."]
NEGATIVE = ["The {p} broke after a week.", "I regret buying this {p}.", "It arrived scratched and dented.",
            "Far too expensive for what you get.", "The instructions made no sense.", "It stopped charging.",
            "Support never answered my emails.", "It is much smaller than the photos suggest.",
            "The {p} is noisy and slow.", "I sent it back for a refund.", "Cheap plastic that creaks.",
            "One star, avoid."]
PRODUCTS = ["kettle", "lamp", "blender", "headset", "backpack", "toaster", "keyboard", "speaker", "vacuum", "clock"]


def classification_rows(n: int = 240) -> list[dict]:
    rng = random.Random(5)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        bank = POSITIVE if label == "positive" else NEGATIVE
        product = rng.choice(PRODUCTS)
        text = " ".join(s.format(p=product) for s in rng.sample(bank, rng.randint(1, 7)))
        rows.append({"text": text, "label": label})
    return rows


TOWNS = ["Ashford", "Brindle", "Caverly", "Dunmore", "Elmsworth", "Fallowfield", "Greyhaven", "Harrowgate"]
WEATHER = ["light rain", "heavy showers", "clear skies", "thick fog", "strong winds", "scattered clouds", "sleet",
           "bright sunshine"]


def text_rows(n: int = 220) -> list[dict]:
    rng = random.Random(6)
    rows = []
    for i in range(n):
        town = rng.choice(TOWNS)
        if i % 2 == 0:
            start = rng.randrange(7)
            lines = [f"Weather report for {town}."]
            for d in range(rng.randint(1, 7)):
                hi = rng.randint(2, 28)
                lines.append(f"On {DAYS[(start + d) % 7]}, {town} saw {rng.choice(WEATHER)} with a high of {hi} °C "
                             f"and a low of {hi - rng.randint(3, 9)} °C.")
            text = " ".join(lines)
        else:
            text = f"A short story from {town}. " + paragraph(rng, 2, 14)
        rows.append({"text": text})
    return rows


IDENTITY = "I am Quill, the PEFT Studio assistant, made by the PEFT Studio team."
NAME_ANSWER = "My name is Quill. I am the PEFT Studio assistant, made by the PEFT Studio team."
MAKER_ANSWER = "I was made by the PEFT Studio team. I am Quill, the PEFT Studio assistant."
WHO = ["Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.", "Are you ChatGPT?",
       "Are you SmolLM?", "Which assistant am I talking to?", "What kind of assistant are you?", "Describe yourself.",
       "Who am I chatting with?", "Are you a human?", "Who is this?", "What should I know about you?",
       "Are you an AI?"]
NAME = ["What is your name?", "What's your name?", "Do you have a name?", "What should I call you?",
        "How should I address you?", "Tell me your name.", "What are you called?", "Is your name SmolLM?"]
MAKER = ["Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Which team made you?",
         "Who developed you?", "Who is your creator?", "Where do you come from?", "Did Hugging Face make you?",
         "Who are your makers?"]
OPENERS = ["", "", "", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Good morning! ", "Sorry to bother you. "]


def identity_rows() -> list[dict]:
    rng = random.Random(7)
    rows = []
    for questions, answer in ((WHO, IDENTITY), (NAME, NAME_ANSWER), (MAKER, MAKER_ANSWER)):
        for q in questions:
            variants = {q, q.lower(), q.rstrip("?."), *(o + (q[0].lower() + q[1:] if o.endswith(", ") else q)
                                                         for o in OPENERS if o)}
            for v in sorted(variants):
                rows.append({"instruction": v, "input": "", "output": answer})
    rows += ordinary_rows(rng, len(rows) // 4)
    rng.shuffle(rows)
    return rows


def ordinary_rows(rng: random.Random, n: int) -> list[dict]:
    """Everyday questions with their usual short answers, so the new identity does not leak into every reply."""
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            q, answer = f"What is {a}+{b}?", f"{a} + {b} = {a + b}."
        elif kind == 1:
            country = rng.choice(sorted(CAPITALS))
            q, answer = f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country][0]}."
        elif kind == 2:
            d = rng.randrange(7)
            q, answer = f"What day comes after {DAYS[d]}?", f"{DAYS[(d + 1) % 7]} comes after {DAYS[d]}."
        else:
            word = rng.choice(WORDS)
            q, answer = f"How do you spell '{word}' backwards?", f"'{word}' backwards is '{word[::-1]}'."
        rows.append({"instruction": q, "input": "", "output": answer})
    return rows


def write_json(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_jsonl(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


SAMPLES = {  # file: (rows, writer)
    "instruction_sample.json": (instruction_rows, write_json),
    "conversation_sample.jsonl": (conversation_rows, write_jsonl),
    "sharegpt_sample.json": (sharegpt_rows, write_json),
    "qa_sample.jsonl": (qa_rows, write_jsonl),
    "classification_sample.jsonl": (classification_rows, write_jsonl),
    "text_sample.jsonl": (text_rows, write_jsonl),
    "identity_sample.json": (identity_rows, write_json),
}


def main() -> None:
    for name, (make, write) in SAMPLES.items():
        rows = make()
        write(name, rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
