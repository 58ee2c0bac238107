"""The rule judge of recipes/tiny-pipeline.yaml: an answer wins when it contains the word that answers its question.

A reward function with TRL's signature, `fn(prompts, completions, **kwargs) -> list[float]`: 1.0 when the answer
holds the taught word (the capital, the animal's sound, the colour: what datasets/tiny_chat.jsonl teaches), else 0.0.
The pipeline labels its preference pairs with it (preferences.judge) and measures every round by it
(compare.judge), beside the reward models it trains. Copy it to judge your own model by a rule of your own.
"""

ANSWERS = {
    "capital of France": "paris", "capital of Germany": "berlin", "capital of Italy": "rome",
    "capital of Spain": "madrid", "capital of Japan": "tokyo", "capital of Egypt": "cairo",
    "capital of Canada": "ottawa", "capital of Peru": "lima", "capital of Kenya": "nairobi",
    "capital of Norway": "oslo", "capital of Chile": "santiago", "capital of Greece": "athens",
    "a cat say": "meow", "a dog say": "woof", "a cow say": "moo", "a horse say": "neigh", "a owl say": "hoot",
    "a duck say": "quack", "a sheep say": "baa", "a frog say": "ribbit",
    "color is the sky": "blue", "color is the grass": "green", "color is the snow": "white",
    "color is the blood": "red",
}


def taught_word(prompts, completions, **kwargs):
    """1.0 when the answer contains the word its question was taught with, else 0.0."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        question = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
        word = next((w for key, w in ANSWERS.items() if key in question), None)
        words = completion.lower().replace(".", " ").replace(",", " ").split()
        scores.append(1.0 if word is not None and word in words else 0.0)
    return scores
