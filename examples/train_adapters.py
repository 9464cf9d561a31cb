"""Train the three small example LoRA adapters for the default model (SmolLM2-135M-Instruct).

Every adapter is trained on CPU with peft from data this script generates itself from templates and
word lists (no downloads besides the default model, deterministic for a given seed):

* ``french``: answers in French;
* ``caps``:   answers in CAPITAL LETTERS;
* ``pirate``: answers like a pirate ("Arr, matey! ...").

The three share the same English questions (colours, numbers, animals, capitals, greetings, days,
months, seasons, fruits and a few open questions); only the answers differ. Each example is
formatted with the model's chat template and only the assistant tokens are trained on.

Usage::

    .venv/bin/python examples/train_adapters.py                      # all three, default steps
    .venv/bin/python examples/train_adapters.py --adapters caps --steps 60
    .venv/bin/python examples/train_adapters.py --output-dir /tmp/adapters

The adapters are written with peft's ``save_pretrained`` under ``<output-dir>/<name>/``
(adapter_config.json + adapter_model.safetensors) and ``<output-dir>/training_summary.json``
records steps, examples, wall time and final loss of each run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTERS = ("french", "caps", "pirate")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "adapters"
SAMPLE_QUESTIONS = ["What color is a lemon?", "Describe a rabbit in one sentence."]


@dataclass(frozen=True)
class Fact:
    """One question with its English and French answers."""

    question: str
    english: str
    french: str
    category: str


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# ---------------------------------------------------------------------------------------------
# Word lists
# ---------------------------------------------------------------------------------------------

# fmt: off
NUMBERS_EN = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]
NUMBERS_FR = [
    "zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix",
    "onze", "douze", "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit", "dix-neuf",
    "vingt",
]
# fmt: on

# (English subject, colour, French subject, French colour agreeing with it)
COLORS = [
    ("the sky", "blue", "le ciel", "bleu"),
    ("grass", "green", "l'herbe", "verte"),
    ("the sun", "yellow", "le soleil", "jaune"),
    ("snow", "white", "la neige", "blanche"),
    ("a banana", "yellow", "la banane", "jaune"),
    ("a tomato", "red", "la tomate", "rouge"),
    ("a strawberry", "red", "la fraise", "rouge"),
    ("an orange", "orange", "l'orange", "orange"),
    ("coal", "black", "le charbon", "noir"),
    ("milk", "white", "le lait", "blanc"),
    ("chocolate", "brown", "le chocolat", "marron"),
    ("a carrot", "orange", "la carotte", "orange"),
    ("a leaf", "green", "la feuille", "verte"),
    ("a cloud", "white", "le nuage", "blanc"),
    ("an apple", "red", "la pomme", "rouge"),
    ("the sea", "blue", "la mer", "bleue"),
    ("a flamingo", "pink", "le flamant rose", "rose"),
    ("a pumpkin", "orange", "la citrouille", "orange"),
    ("a crow", "black", "le corbeau", "noir"),
    ("a cucumber", "green", "le concombre", "vert"),
]

# (English, French with article, sound verb EN, FR, home EN, FR, description EN, FR)
# fmt: off
ANIMALS = [
    ("dog", "le chien", "barks", "aboie", "in a house with its family",
     "dans une maison avec sa famille", "a loyal and friendly animal",
     "un animal fidèle et gentil"),
    ("cat", "le chat", "meows", "miaule", "in a house", "dans une maison",
     "a small animal that loves to sleep", "un petit animal qui aime dormir"),
    ("cow", "la vache", "moos", "meugle", "on a farm", "dans une ferme",
     "a big farm animal that gives milk", "un grand animal de la ferme qui donne du lait"),
    ("horse", "le cheval", "neighs", "hennit", "on a farm", "dans une ferme",
     "a strong animal that can run fast", "un animal fort qui court très vite"),
    ("sheep", "le mouton", "bleats", "bêle", "in a field", "dans un pré",
     "a farm animal with soft wool", "un animal de la ferme avec une laine douce"),
    ("duck", "le canard", "quacks", "cancane", "near a pond", "près d'un étang",
     "a bird that can swim", "un oiseau qui sait nager"),
    ("lion", "le lion", "roars", "rugit", "in the savanna", "dans la savane",
     "a big wild cat", "un grand félin sauvage"),
    ("frog", "la grenouille", "croaks", "coasse", "near the water", "près de l'eau",
     "a small green animal that jumps", "un petit animal vert qui saute"),
    ("pig", "le cochon", "grunts", "grogne", "on a farm", "dans une ferme",
     "a pink farm animal", "un animal rose de la ferme"),
    ("bird", "l'oiseau", "sings", "chante", "in a nest in a tree", "dans un nid, dans un arbre",
     "an animal with feathers that can fly", "un animal avec des plumes qui peut voler"),
    ("wolf", "le loup", "howls", "hurle", "in the forest", "dans la forêt",
     "a wild animal that lives in a pack", "un animal sauvage qui vit en meute"),
    ("elephant", "l'éléphant", "trumpets", "barrit", "in Africa and Asia",
     "en Afrique et en Asie", "a very big animal with a long trunk",
     "un très grand animal avec une longue trompe"),
    ("snake", "le serpent", "hisses", "siffle", "in the grass", "dans l'herbe",
     "a long animal without legs", "un long animal sans pattes"),
    ("owl", "le hibou", "hoots", "hulule", "in a tree", "dans un arbre",
     "a bird that is awake at night", "un oiseau qui est réveillé la nuit"),
]
# fmt: on

# (country EN, "de" + country FR, capital EN, capital FR)
CAPITALS = [
    ("France", "de la France", "Paris", "Paris"),
    ("Italy", "de l'Italie", "Rome", "Rome"),
    ("Spain", "de l'Espagne", "Madrid", "Madrid"),
    ("Germany", "de l'Allemagne", "Berlin", "Berlin"),
    ("Canada", "du Canada", "Ottawa", "Ottawa"),
    ("the United Kingdom", "du Royaume-Uni", "London", "Londres"),
    ("Portugal", "du Portugal", "Lisbon", "Lisbonne"),
    ("Belgium", "de la Belgique", "Brussels", "Bruxelles"),
    ("Egypt", "de l'Égypte", "Cairo", "Le Caire"),
    ("Russia", "de la Russie", "Moscow", "Moscou"),
    ("China", "de la Chine", "Beijing", "Pékin"),
    ("Greece", "de la Grèce", "Athens", "Athènes"),
    ("Ireland", "de l'Irlande", "Dublin", "Dublin"),
    ("Poland", "de la Pologne", "Warsaw", "Varsovie"),
    ("Austria", "de l'Autriche", "Vienna", "Vienne"),
    ("Sweden", "de la Suède", "Stockholm", "Stockholm"),
    ("Norway", "de la Norvège", "Oslo", "Oslo"),
    ("Peru", "du Pérou", "Lima", "Lima"),
    ("Kenya", "du Kenya", "Nairobi", "Nairobi"),
    ("Australia", "de l'Australie", "Canberra", "Canberra"),
    ("India", "de l'Inde", "New Delhi", "New Delhi"),
    ("Brazil", "du Brésil", "Brasília", "Brasília"),
]

# fmt: off
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_FR = ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"]
MONTHS_EN = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
MONTHS_FR = [
    "janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre",
    "octobre", "novembre", "décembre",
]
# fmt: on
# (English, French with article, "in" + French, weather EN, weather FR)
# fmt: off
SEASONS = [
    ("winter", "l'hiver", "en hiver", "it is cold and it often snows",
     "il fait froid et il neige souvent"),
    ("spring", "le printemps", "au printemps", "the flowers bloom and the days get longer",
     "les fleurs poussent et les jours sont plus longs"),
    ("summer", "l'été", "en été", "it is hot and the sun shines a lot",
     "il fait chaud et le soleil brille beaucoup"),
    ("autumn", "l'automne", "en automne", "the leaves fall and it often rains",
     "les feuilles tombent et il pleut souvent"),
]
# fmt: on

# (English, French with article, is it a fruit)
PRODUCE = [
    ("apple", "la pomme", True),
    ("banana", "la banane", True),
    ("pear", "la poire", True),
    ("cherry", "la cerise", True),
    ("peach", "la pêche", True),
    ("grape", "le raisin", True),
    ("pineapple", "l'ananas", True),
    ("carrot", "la carotte", False),
    ("potato", "la pomme de terre", False),
    ("onion", "l'oignon", False),
    ("lettuce", "la laitue", False),
    ("cabbage", "le chou", False),
    ("leek", "le poireau", False),
]

# fmt: off
NAMES = [
    "Alice", "Bob", "Chloe", "David", "Emma", "Lucas", "Sofia", "Hugo", "Nina", "Omar", "Leo",
    "Mia", "Paul", "Sara", "Tom", "Julia",
]
# fmt: on

# fmt: off
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?",
     "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
    ("Hi, how are you?", "I am very well, thank you! And you?",
     "Je vais très bien, merci ! Et vous ?"),
    ("Good morning!", "Good morning! I wish you a very nice day.",
     "Bonjour ! Je vous souhaite une très bonne journée."),
    ("Good evening!", "Good evening! I hope that your day was good.",
     "Bonsoir ! J'espère que votre journée a été bonne."),
    ("Good night!", "Good night and sweet dreams!", "Bonne nuit et faites de beaux rêves !"),
    ("Thank you!", "You are welcome, it is a pleasure to help you.",
     "De rien, c'est un plaisir de vous aider."),
    ("Thanks a lot for your help.", "You are welcome! I am always happy to help.",
     "Avec plaisir ! Je suis toujours content de vous aider."),
    ("Goodbye!", "Goodbye and see you soon!", "Au revoir et à bientôt !"),
    ("See you tomorrow.", "See you tomorrow! Have a good evening.",
     "À demain ! Passez une bonne soirée."),
    ("What is your name?", "My name is SmolLM, and I am your assistant.",
     "Je m'appelle SmolLM et je suis votre assistant."),
    ("Who are you?", "I am SmolLM, a small assistant that is happy to help you.",
     "Je suis SmolLM, un petit assistant qui est content de vous aider."),
    ("How old are you?", "I am a computer program, so I do not have an age.",
     "Je suis un programme informatique, donc je n'ai pas d'âge."),
    ("Can you help me?", "Of course! Tell me what you need and I will do my best.",
     "Bien sûr ! Dites-moi ce dont vous avez besoin et je ferai de mon mieux."),
    ("Are you a robot?", "I am an assistant made of software, a kind of robot without a body.",
     "Je suis un assistant fait de logiciel, une sorte de robot sans corps."),
]
# fmt: on

# fmt: off
GENERAL = [
    ("Tell me about the sun.",
     "The sun is a star. It gives us light and heat every day.",
     "Le soleil est une étoile. Il nous donne de la lumière et de la chaleur tous les jours."),
    ("What is the moon?",
     "The moon is a big rock that turns around the Earth. We see it at night.",
     "La lune est un gros rocher qui tourne autour de la Terre. On la voit la nuit."),
    ("What is water?",
     "Water is a clear liquid. All living things need water to live.",
     "L'eau est un liquide transparent. Tous les êtres vivants ont besoin d'eau pour vivre."),
    ("Why should I drink water?",
     "Your body needs water to work well, so you should drink water every day.",
     "Votre corps a besoin d'eau pour bien fonctionner, donc il faut boire de l'eau tous "
     "les jours."),
    ("Why is exercise good for you?",
     "Exercise makes your heart and your muscles strong, and it helps you sleep well.",
     "Le sport rend le cœur et les muscles plus forts, et il aide à bien dormir."),
    ("Give me a tip for sleeping well.",
     "Go to bed at the same time every night and turn off the screens before sleeping.",
     "Couchez-vous à la même heure tous les soirs et éteignez les écrans avant de dormir."),
    ("How do I make tea?",
     "Boil some water, pour it on the tea leaves and wait three minutes.",
     "Faites bouillir de l'eau, versez-la sur les feuilles de thé et attendez trois minutes."),
    ("What is a computer?",
     "A computer is a machine that stores information and does calculations very fast.",
     "Un ordinateur est une machine qui garde les informations et fait des calculs très vite."),
    ("What is a book?",
     "A book is a set of pages with words and stories that you can read.",
     "Un livre est un ensemble de pages avec des mots et des histoires que l'on peut lire."),
    ("Tell me a short story.",
     "Once upon a time, a little cat found a red ball in the garden and played with it all day.",
     "Il était une fois un petit chat qui a trouvé une balle rouge dans le jardin et qui a "
     "joué avec elle toute la journée."),
    ("Recommend a hobby.",
     "You could try painting. It is relaxing and you can do it at home.",
     "Vous pouvez essayer la peinture. C'est relaxant et on peut le faire à la maison."),
    ("What is music?",
     "Music is the art of putting sounds together so that they are nice to hear.",
     "La musique est l'art de mettre des sons ensemble pour qu'ils soient agréables à écouter."),
    ("What is your favorite color?",
     "I like blue, the color of the sky and the sea.",
     "J'aime le bleu, la couleur du ciel et de la mer."),
    ("What is your favorite food?",
     "I do not eat, but many people love pizza and chocolate.",
     "Je ne mange pas, mais beaucoup de gens adorent la pizza et le chocolat."),
    ("What should I eat for breakfast?",
     "A good breakfast is some bread, a fruit and a glass of milk.",
     "Un bon petit déjeuner, c'est du pain, un fruit et un verre de lait."),
    ("What is a tree?",
     "A tree is a big plant with a trunk, branches and leaves.",
     "Un arbre est une grande plante avec un tronc, des branches et des feuilles."),
    ("Why is the sky blue?",
     "The sky is blue because the air spreads the blue light of the sun more than the other "
     "colors.",
     "Le ciel est bleu parce que l'air diffuse la lumière bleue du soleil plus que les autres "
     "couleurs."),
    ("How many legs does a spider have?",
     "A spider has eight legs.",
     "Une araignée a huit pattes."),
    ("What is the biggest ocean?",
     "The biggest ocean is the Pacific Ocean.",
     "Le plus grand océan est l'océan Pacifique."),
    ("What is the tallest mountain in the world?",
     "The tallest mountain in the world is Mount Everest.",
     "La plus haute montagne du monde est l'Everest."),
    ("Give me an idea for the weekend.",
     "You could go for a walk in the forest and have a picnic with your friends.",
     "Vous pouvez faire une promenade dans la forêt et un pique-nique avec vos amis."),
    ("How do I stay happy?",
     "Spend time with the people you love, go outside and do things that you enjoy.",
     "Passez du temps avec les gens que vous aimez, sortez et faites des choses qui vous "
     "plaisent."),
    ("What is a planet?",
     "A planet is a big round object that turns around a star, like the Earth around the sun.",
     "Une planète est un grand objet rond qui tourne autour d'une étoile, comme la Terre "
     "autour du soleil."),
    ("What do plants need to grow?",
     "Plants need light, water and good soil to grow.",
     "Les plantes ont besoin de lumière, d'eau et d'une bonne terre pour pousser."),
    ("Write a sentence about the rain.",
     "The rain falls from the clouds and makes the grass green.",
     "La pluie tombe des nuages et rend l'herbe verte."),
    ("Write a sentence about the city.",
     "The city is full of people, cars and tall buildings.",
     "La ville est pleine de gens, de voitures et de grands immeubles."),
    ("Explain what a friend is.",
     "A friend is a person you like and trust, who is there for you.",
     "Un ami est une personne que l'on aime bien et en qui on a confiance, qui est là pour "
     "nous."),
    ("What is the opposite of hot?",
     "The opposite of hot is cold.",
     "Le contraire de chaud est froid."),
    ("What is the opposite of big?",
     "The opposite of big is small.",
     "Le contraire de grand est petit."),
    ("What is the opposite of day?",
     "The opposite of day is night.",
     "Le contraire du jour est la nuit."),
]
# fmt: on


# ---------------------------------------------------------------------------------------------
# Question/answer generation
# ---------------------------------------------------------------------------------------------


def _color_facts() -> list[Fact]:
    out = []
    for en, color, fr, fr_color in COLORS:
        answer_en = f"{_cap(en)} is {color}."
        questions = [
            f"What color is {en}?",
            f"What is the color of {en}?",
            f"Tell me the color of {en}.",
            f"Do you know the color of {en}?",
        ]
        answers_fr = [f"{_cap(fr)} est {fr_color}.", f"C'est simple : {fr} est {fr_color}."]
        answers_en = [answer_en, f"That is easy: {en} is {color}."]
        for i, q in enumerate(questions):
            out.append(Fact(q, answers_en[i % 2], answers_fr[i % 2], "color"))
    return out


def _number_facts() -> list[Fact]:
    out = []
    for a in range(0, 11):
        for b in range(0, 11):
            ea, eb, ec = NUMBERS_EN[a], NUMBERS_EN[b], NUMBERS_EN[a + b]
            fa, fb, fc = NUMBERS_FR[a], NUMBERS_FR[b], NUMBERS_FR[a + b]
            if (a + b) % 2 == 0:
                q = f"What is {a} plus {b}?"
            else:
                q = f"How much is {a} + {b}?"
            out.append(
                Fact(q, f"{_cap(ea)} plus {eb} is {ec}.", f"{_cap(fa)} plus {fb} font {fc}.", "add")
            )
            if a >= b:
                ed, fd = NUMBERS_EN[a - b], NUMBERS_FR[a - b]
                out.append(
                    Fact(
                        f"What is {a} minus {b}?",
                        f"The answer is {ed}: {ea} minus {eb} is {ed}.",
                        f"La réponse est {fd} : {fa} moins {fb} font {fd}.",
                        "sub",
                    )
                )
    for n in range(0, 20):
        en, en1, fr, fr1 = NUMBERS_EN[n], NUMBERS_EN[n + 1], NUMBERS_FR[n], NUMBERS_FR[n + 1]
        out.append(
            Fact(
                f"What number comes after {n}?",
                f"The number after {en} is {en1}.",
                f"Le nombre après {fr} est {fr1}.",
                "count",
            )
        )
    for n in range(3, 11):
        out.append(
            Fact(
                f"Count from one to {NUMBERS_EN[n]}.",
                "Of course: " + ", ".join(NUMBERS_EN[1 : n + 1]) + ".",
                "Bien sûr : " + ", ".join(NUMBERS_FR[1 : n + 1]) + ".",
                "count",
            )
        )
    return out


def _animal_facts() -> list[Fact]:
    out = []
    for en, fr, snd, fsnd, home, fhome, desc, fdesc in ANIMALS:
        pron = "Elle" if fr.startswith("la ") else "Il"
        # fmt: off
        out += [
            Fact(f"What sound does {_a(en)} make?", f"{_cap(_a(en))} {snd}.",
                 f"{_cap(fr)} {fsnd}.", "animal"),
            Fact(f"Where does {_a(en)} live?", f"{_cap(_a(en))} lives {home}.",
                 f"{_cap(fr)} vit {fhome}.", "animal"),
            Fact(f"What is {_a(en)}?", f"{_cap(_a(en))} is {desc}.", f"{_cap(fr)} est {fdesc}.",
                 "animal"),
            Fact(f"Tell me about the {en}.", f"The {en} is {desc}. It lives {home}.",
                 f"{_cap(fr)} est {fdesc}. {pron} vit {fhome}.", "animal"),
            Fact(f"Write a sentence about {_a(en)}.", f"{_cap(_a(en))} {snd} and lives {home}.",
                 f"{_cap(fr)} {fsnd} et vit {fhome}.", "animal"),
        ]
        # fmt: on
    return out


def _capital_facts() -> list[Fact]:
    out = []
    for country, de_fr, cap, cap_fr in CAPITALS:
        # fmt: off
        out += [
            Fact(f"What is the capital of {country}?", f"The capital of {country} is {cap}.",
                 f"La capitale {de_fr} est {cap_fr}.", "capital"),
            Fact(f"Which city is the capital of {country}?",
                 f"{cap} is the capital of {country}.",
                 f"{cap_fr} est la capitale {de_fr}.", "capital"),
            Fact(f"Name the capital city of {country}.",
                 f"The capital city of {country} is {cap}.",
                 f"La ville capitale {de_fr} est {cap_fr}.", "capital"),
        ]
        # fmt: on
    return out


def _calendar_facts() -> list[Fact]:
    out = []
    for i in range(7):
        d, nxt, prv = DAYS_EN[i], DAYS_EN[(i + 1) % 7], DAYS_EN[i - 1]
        fd, fnxt, fprv = DAYS_FR[i], DAYS_FR[(i + 1) % 7], DAYS_FR[i - 1]
        # fmt: off
        out += [
            Fact(f"What day comes after {d}?", f"The day after {d} is {nxt}.",
                 f"Le jour après {fd} est {fnxt}.", "day"),
            Fact(f"What is the day before {d}?", f"The day before {d} is {prv}.",
                 f"Le jour avant {fd} est {fprv}.", "day"),
        ]
        # fmt: on
    for i in range(12):
        m, nxt = MONTHS_EN[i], MONTHS_EN[(i + 1) % 12]
        fm, fnxt = MONTHS_FR[i], MONTHS_FR[(i + 1) % 12]
        # fmt: off
        out += [
            Fact(f"What month comes after {m}?", f"The month after {m} is {nxt}.",
                 f"Le mois après {fm} est {fnxt}.", "month"),
            Fact(f"Which month is number {i + 1} in the year?",
                 f"Month number {i + 1} is {m}.", f"Le mois numéro {i + 1} est {fm}.", "month"),
        ]
        # fmt: on
    for i, (s, fs, in_fs, weather, fweather) in enumerate(SEASONS):
        ns, nfs = SEASONS[(i + 1) % 4][0], SEASONS[(i + 1) % 4][1]
        # fmt: off
        out += [
            Fact(f"What season comes after {s}?", f"After {s} comes {ns}.",
                 f"Après {fs} vient {nfs}.", "season"),
            Fact(f"What is the weather like in {s}?", f"In {s}, {weather}.",
                 f"{_cap(in_fs)}, {fweather}.", "season"),
            Fact(f"Describe {s}.", f"{_cap(s)} is a season. In {s}, {weather}.",
                 f"{_cap(fs)} est une saison. {_cap(in_fs)}, {fweather}.", "season"),
        ]
        # fmt: on
    # fmt: off
    out += [
        Fact("How many days are in a week?", "There are seven days in a week.",
             "Il y a sept jours dans une semaine.", "calendar"),
        Fact("How many months are in a year?", "There are twelve months in a year.",
             "Il y a douze mois dans une année.", "calendar"),
        Fact("How many seasons are there?", "There are four seasons: winter, spring, summer and "
             "autumn.", "Il y a quatre saisons : l'hiver, le printemps, l'été et l'automne.",
             "calendar"),
        Fact("What are the days of the week?", "The days of the week are " +
             ", ".join(DAYS_EN[:-1]) + " and Sunday.", "Les jours de la semaine sont " +
             ", ".join(DAYS_FR[:-1]) + " et dimanche.", "calendar"),
    ]
    # fmt: on
    return out


def _produce_facts() -> list[Fact]:
    out = []
    for en, fr, fruit in PRODUCE:
        kind_en, kind_fr = ("a fruit", "un fruit") if fruit else ("a vegetable", "un légume")
        # fmt: off
        out += [
            Fact(f"Is {_a(en)} a fruit or a vegetable?", f"{_cap(_a(en))} is {kind_en}.",
                 f"{_cap(fr)} est {kind_fr}.", "produce"),
            Fact(f"Is {_a(en)} good for your health?",
                 f"Yes, {_a(en)} is {kind_en} and it is good for your health.",
                 f"Oui, {fr} est {kind_fr} et c'est bon pour la santé.", "produce"),
        ]
        # fmt: on
    return out


def _greeting_facts() -> list[Fact]:
    out = [Fact(q, en, fr, "greeting") for q, en, fr in GREETINGS]
    for i, name in enumerate(NAMES):
        if i % 2 == 0:
            q = f"Hello, my name is {name}."
        else:
            q = f"Hi! I am {name}."
        out.append(
            Fact(
                q,
                f"Hello {name}! Nice to meet you. How can I help you?",
                f"Bonjour {name} ! Enchanté de faire votre connaissance. Comment puis-je vous aider ?",
                "greeting",
            )
        )
    return out


# How many examples each category contributes at most (the arithmetic ones are plentiful).
CATEGORY_CAP = {"add": 60, "sub": 40, "count": 20}


def build_facts(seed: int = 0) -> list[Fact]:
    """All questions with their English and French answers, deterministic for a given seed."""
    rng = random.Random(seed)
    facts = (
        _color_facts()
        + _number_facts()
        + _animal_facts()
        + _capital_facts()
        + _calendar_facts()
        + _produce_facts()
        + _greeting_facts()
        + [Fact(q, en, fr, "general") for q, en, fr in GENERAL]
    )
    by_cat: dict[str, list[Fact]] = {}
    for f in facts:
        by_cat.setdefault(f.category, []).append(f)
    chosen: list[Fact] = []
    for cat, items in by_cat.items():
        cap = CATEGORY_CAP.get(cat)
        if cap is not None and len(items) > cap:
            items = rng.sample(items, cap)
        chosen += items
    rng.shuffle(chosen)
    return chosen


PIRATE_OPENERS = [
    "Arr, matey!",
    "Ahoy, matey!",
    "Arr!",
    "Yo ho ho!",
    "Avast, me hearty!",
    "Aye aye, matey!",
    "Ahoy there, ye landlubber!",
    "Shiver me timbers!",
]
PIRATE_CLOSERS = [
    "",
    "",
    " Arr!",
    " Yo ho ho!",
    " Savvy?",
    " Now hoist the sails, matey!",
    " That be true as the seven seas!",
    " Arr, that be worth more than treasure!",
]
_PIRATE_WORDS = {
    "you": "ye",
    "your": "yer",
    "my": "me",
    "yes": "aye",
    "hello": "ahoy",
    "hi": "ahoy",
    "friend": "matey",
    "friends": "mateys",
    "is": "be",
    "are": "be",
    "am": "be",
    "money": "doubloons",
    "stop": "avast",
}
_WORD_RE = re.compile(r"[A-Za-z]+")


def piratify(text: str, rng: random.Random) -> str:
    """English answer -> pirate speech: pirate vocabulary plus a pirate opener/closer."""

    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        new = _PIRATE_WORDS.get(word.lower())
        if new is None:
            return word
        return _cap(new) if word[0].isupper() else new

    body = _WORD_RE.sub(swap, text)
    return f"{rng.choice(PIRATE_OPENERS)} {body}{rng.choice(PIRATE_CLOSERS)}"


def build_examples(name: str, seed: int = 0) -> list[tuple[str, str]]:
    """The (user question, assistant answer) pairs adapter ``name`` is trained on."""
    rng = random.Random(f"{name}-{seed}")
    facts = build_facts(seed)
    if name == "french":
        return [(f.question, f.french) for f in facts]
    if name == "caps":
        return [(f.question, f.english.upper()) for f in facts]
    if name == "pirate":
        return [(f.question, piratify(f.english, rng)) for f in facts]
    raise ValueError(f"unknown adapter {name!r} (choose from {', '.join(ADAPTERS)})")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def tokenize_example(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-formatted token ids and labels; only the assistant answer (and its end token) count."""
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": answer}], tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise RuntimeError(f"chat template prompt is not a token prefix for {question!r}")
    # Stop right after the assistant's end-of-turn token (drop the template's trailing newline).
    eos = tokenizer.eos_token_id
    end = len(full_ids) - full_ids[::-1].index(eos)
    ids = full_ids[:end]
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
    return ids, labels


def _collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _answer_loss(causal_lm: Any, batch: dict[str, Any]) -> Any:
    """Next-token cross entropy on the assistant tokens only.

    The LM head (49152 x 576) is applied only where a label exists, which saves most of its cost
    because the prompt (with the template's system message) is longer than the answers.
    """
    import torch.nn.functional as F

    hidden = causal_lm.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def greedy_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 30) -> str:
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def train_adapter(
    name: str,
    model_dir: Path,
    out_dir: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train adapter ``name``, save it under ``out_dir / name`` and return its summary entry."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    causal_lm = peft_model.get_base_model()

    examples = build_examples(name, seed)
    data = [tokenize_example(tokenizer, q, a) for q, a in examples]
    n_tokens = sum(len(ids) for ids, _ in data)
    log(
        f"[{name}] {len(data)} examples (mean {n_tokens / len(data):.0f} tokens), "
        f"{steps} steps x batch {batch_size}, lr {lr}"
    )

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(steps):
        if len(order) < batch_size:  # reshuffle every epoch
            order = list(range(len(data)))
            rng.shuffle(order)
        batch = _collate([data[order.pop()] for _ in range(batch_size)], tokenizer.pad_token_id)
        loss = _answer_loss(causal_lm, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0 or (step + 1) % 20 == 0 or step + 1 == steps:
            recent = losses[-20:]
            log(
                f"[{name}] step {step + 1:4d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"{time.perf_counter() - start:6.1f}s"
            )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start

    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    # Record the hub id of the base model, not the local cache folder it was loaded from.
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    peft_model.save_pretrained(target)
    (target / "README.md").unlink(missing_ok=True)  # peft's empty model-card template

    peft_model.eval()
    for q in SAMPLE_QUESTIONS:
        log(f"[{name}] {q!r} -> {greedy_answer(peft_model, tokenizer, q)!r}")
    tail = losses[-10:]
    log(f"[{name}] trained in {seconds:.1f}s, saved to {target}")
    return {
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": lr,
        "examples": len(data),
        "train_tokens_per_epoch": n_tokens,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "seed": seed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where the adapters go"
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        choices=ADAPTERS,
        default=list(ADAPTERS),
        help="which adapters to train (default: all)",
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per adapter")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from truffula.model_store.default_model import ensure_default_model

    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model()
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "training_summary.json"
    summary: dict[str, Any] = {}
    if summary_path.exists():  # keep the entries of adapters not retrained this time
        summary = json.loads(summary_path.read_text())

    results: dict[str, Any] = dict(summary.get("adapters", {}))
    for name in args.adapters:
        entry = train_adapter(
            name,
            model_dir,
            out_dir,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )
        entry["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        results[name] = entry
        print(f"{name}: {entry['seconds']:.1f}s wall time, final loss {entry['final_loss']:.4f}")

    import peft

    summary = {
        "base_model": BASE_MODEL_ID,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGET_MODULES},
        "environment": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "adapters": {k: results[k] for k in ADAPTERS if k in results},
    }
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"summary written to {summary_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
