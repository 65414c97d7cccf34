import sys, torch
sys.path.insert(0, "/work/main/src")
from nanoseek import load_model
from nanoseek.tokenizer import load_tokenizer
from nanoseek.eval.passkey import passkey_prompts, extended, ANSWER_TOKENS
from nanoseek.data.chat_tokens import completion_text
from nanoseek.engine import Engine, SamplingParams
ck = sys.argv[1]
model = load_model(ck, dtype=torch.float32).eval(); tok = load_tokenizer(ck)
for length in [256, 1024]:
    for lang in ["en", "zh"]:
        ps = passkey_prompts(tok, length, (0.1, 0.5, 0.9), 3, lang=lang)
        eng = Engine(extended(model, length), max_batch_size=16)
        outs = eng.generate([ids for _, ids in ps], SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0))
        for (p, ids), o in zip(ps, outs):
            t = completion_text(tok, o.token_ids if hasattr(o, "token_ids") else o)
            print(length, lang, p.answer, "|", t.replace("\n", " ")[:120])
