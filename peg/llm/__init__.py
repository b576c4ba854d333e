"""LLM stages: relevance scorer (yes_no / query_likelihood), false-negative judge, teacher scoring,
synthetic queries with a round-trip filter; all run on Ray actors over stored shards."""

from peg.llm.judge import is_false_negative, judge_examples, run_judge
from peg.llm.loading import LLMError, convert_gguf, load_causal_lm, model_folder
from peg.llm.scorer import LLMScorer
from peg.llm.synth import QueryWriter, round_trip_outcome, run_synth
from peg.llm.teacher import CrossEncoderTeacher, load_teacher, run_score, score_candidates, score_examples

__all__ = [
    "CrossEncoderTeacher",
    "LLMError",
    "LLMScorer",
    "QueryWriter",
    "convert_gguf",
    "is_false_negative",
    "judge_examples",
    "load_causal_lm",
    "load_teacher",
    "model_folder",
    "round_trip_outcome",
    "run_judge",
    "run_score",
    "run_synth",
    "score_candidates",
    "score_examples",
]
