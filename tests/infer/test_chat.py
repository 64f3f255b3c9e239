"""panda chat: history kept between turns, /reset clears it, /exit leaves with 0."""

from __future__ import annotations

import io

import pytest

from panda.infer.chat_repl import HELP, read_message

GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]


def expected_reply(backend, messages):
    """The reply to a whole conversation, computed without the chat loop."""
    from panda.infer.generation import complete
    from panda.infer.prompting import encode_prompt
    from panda.infer.sampling import Sampling

    ids = encode_prompt(backend.tokenizer, messages=messages)
    return complete(backend, [ids], Sampling(temperature=0, max_new_tokens=12))[0].text


def test_chat_through_stdin_keeps_history_resets_and_exits(run_panda_input, tiny_model_dir,
                                                             hf_backend):
    script = ("hello\nhow are you\n/history\n/reset\nhow are you\n"
              "/system be brief\n/reset\nhello\n/system\n/bogus\n/exit\nnever answered\n")
    result = run_panda_input(script, "chat", "--model", str(tiny_model_dir), *GREEDY)
    assert result.returncode == 0, result.stderr

    first = expected_reply(hf_backend, [{"role": "user", "content": "hello"}])
    second = expected_reply(hf_backend, [{"role": "user", "content": "hello"},
                                         {"role": "assistant", "content": first},
                                         {"role": "user", "content": "how are you"}])
    fresh = expected_reply(hf_backend, [{"role": "user", "content": "how are you"}])
    assert second != fresh, "pick prompts whose answer depends on the history"
    history = (f"[user] hello\n[assistant] {first}\n"
               f"[user] how are you\n[assistant] {second}\n")
    with_system = expected_reply(hf_backend, [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hello"}])
    assert result.stdout == f"{first}\n{second}\n{history}{fresh}\n{with_system}\n"
    assert result.stderr.splitlines() == [
        "(history cleared)", "(system message set)", "(history cleared)",
        "(system message removed)", "unknown command /bogus", *HELP.splitlines()]


def test_query_answers_once(run_panda_input, tiny_model_dir, hf_backend):
    query = run_panda_input("ignored\n", "chat", "--model", str(tiny_model_dir), "--system",
                            "be brief", "--query", "hello", *GREEDY)
    assert query.returncode == 0, query.stderr
    assert query.stdout == expected_reply(hf_backend, [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "hello"}]) + "\n"


def test_history_is_trimmed_to_fit_the_context(hf_backend):
    from panda.infer.chat import ChatSession
    from panda.infer.sampling import Sampling

    session = ChatSession(hf_backend, Sampling(temperature=0, max_new_tokens=700),
                          system="system text stays")
    for turn in range(6):
        session.history += [{"role": "user", "content": f"question {turn} " * 10},
                            {"role": "assistant", "content": f"answer {turn} " * 10}]
    ids = session.prompt_ids("last question")
    assert len(ids) + 700 <= hf_backend.context_length
    text = hf_backend.tokenizer.decode(ids)
    assert "system text stays" in text and "last question" in text
    assert "question 0" not in text and "question 5" in text


@pytest.mark.parametrize("typed, message", [
    (["one line"], "one line"),
    (["first \\", "second\\", "third"], "first \nsecond\nthird"),
    (['"""', "pasted", "", "  indented", '"""', "next"], "pasted\n\n  indented"),
    (['"""', "never closed"], "never closed"),
])
def test_multi_line_input(typed, message):
    lines = iter(typed)
    assert read_message(lambda prompt: next(lines, None)) == message


def test_end_of_input_is_none():
    assert read_message(lambda prompt: None) is None


def test_repl_prints_only_replies_on_stdout(hf_backend):
    from panda.infer.chat import ChatSession
    from panda.infer.chat_repl import run_chat
    from panda.infer.sampling import Sampling

    session = ChatSession(hf_backend, Sampling(temperature=0, max_new_tokens=5))
    lines = iter(["hi", "/help", "/exit"])
    out, notices = io.StringIO(), io.StringIO()
    assert run_chat(session, lambda prompt: next(lines, None), out, notices) == 0
    assert out.getvalue() == session.history[1]["content"] + "\n"
    assert notices.getvalue().startswith("commands: /reset")


def test_chat_over_two_tensor_parallel_ranks(run_panda_input, tiny_model_dir, hf_backend):
    # Rank 0 reads stdin and hands each message to rank 1; only rank 0 prints.
    result = run_panda_input("hello\n/history\n/exit\n", "chat", "--model", str(tiny_model_dir),
                             "--backend", "torch-tp", "--nproc", "2", *GREEDY)
    assert result.returncode == 0, result.stderr
    first = expected_reply(hf_backend, [{"role": "user", "content": "hello"}])
    assert result.stdout.endswith(f"{first}\n[user] hello\n[assistant] {first}\n")
