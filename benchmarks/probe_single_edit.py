"""One edit (France's capital -> Rome) under several settings: does it land, generalise, and leave neighbours?

Usage: ``python benchmarks/probe_single_edit.py '{}' '{"method": "alphaedit"}' ...`` (each argument is a JSON
object of EditConfig overrides). Prints, per setting, whether P(new) > P(old) on the edit prompt and a
paraphrase, and whether neighbours (other capitals, France's language) keep their answer.
"""

import json
import sys
import time

from nmke_patch.create import LoadedModel, create_patch, target_probabilities
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.models import load_base
from nmke_patch.requests import EditRequest
from nmke_patch.stack import PatchStack

lm = LoadedModel(*load_base())
m, tok = lm.model, lm.tokenizer
req = EditRequest(
    "The capital of {} is", "France", "Rome", target_true="Paris", paraphrases=("France's capital city is",)
)
checks = [
    ("The capital of France is", "Rome", "Paris"),
    ("France's capital city is", "Rome", "Paris"),
    ("The capital of Germany is", "Berlin", "Rome"),
    ("The capital of Spain is", "Madrid", "Rome"),
    ("The capital of Japan is", "Tokyo", "Rome"),
    ("The official language of France is", "French", "Italian"),
]
for spec in sys.argv[1:]:
    cfg = EditConfig().with_overrides(**json.loads(spec))
    t = time.time()
    p = create_patch([req], loaded=lm, config=cfg, name="x")
    st = PatchStack.for_model(m)
    st.apply(p)
    a = target_probabilities(m, tok, [c[0] for c in checks], [c[1] for c in checks]).tolist()
    b = target_probabilities(m, tok, [c[0] for c in checks], [c[2] for c in checks]).tolist()
    st.unload_all()
    ok = [x > y for x, y in zip(a, b, strict=True)]
    print(
        spec,
        "sec",
        round(time.time() - t, 1),
        "neurons",
        [d.num_neurons for d in p.deltas],
        ok,
        [round(x, 3) for x in a],
        [round(x, 3) for x in b],
        flush=True,
    )
