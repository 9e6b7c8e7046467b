"""The WebUI's dataset side: every local entry of LlamaFactory's own data/dataset_info.json loads (the
registry verbatim, records trimmed from its demo files), tool calls keep their tools and roles, and a
registry upload is checked against the files beside it before it is written."""
from __future__ import annotations

import json

import pytest

from hublab.trainer import data as D
from hublab.trainer.webui_data import WebError, inside, save_upload

# hiyouga/LLaMA-Factory data/dataset_info.json: its entries with a local file_name, verbatim
LLAMAFACTORY_INFO = json.loads('{"identity": {"file_name": "identity.json"}, "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}, "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"}, "glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}, "glaive_toolcall_zh_demo": {"file_name": "glaive_toolcall_zh_demo.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}, "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}, "mllm_audio_demo": {"file_name": "mllm_audio_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages", "audios": "audios"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}, "mllm_video_demo": {"file_name": "mllm_video_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages", "videos": "videos"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}, "mllm_video_audio_demo": {"file_name": "mllm_video_audio_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages", "videos": "videos", "audios": "audios"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}, "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": true, "formatting": "sharegpt", "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}, "dpo_zh_demo": {"file_name": "dpo_zh_demo.json", "ranking": true, "formatting": "sharegpt", "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}, "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}, "wiki_demo": {"file_name": "wiki_demo.txt", "columns": {"prompt": "text"}}, "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}}}')
# the first records of each demo file, strings cut to 60 characters (JSON text as the files hold it)
SAMPLES = {
    'identity.json': '[{"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an AI assistant developed by {{author}"}, {"instruction": "hello", "input": "", "output": "Hello! I am {{name}}, an AI assistant developed by {{author}"}]',
    'alpaca_en_demo.json': '[{"instruction": "Describe a process of making crepes.", "input": "", "output": "Making crepes is an easy and delicious process! Here are ste"}, {"instruction": "Transform the following sentence using a synonym: The car sp", "input": "", "output": "The car accelerated rapidly."}]',
    'alpaca_zh_demo.json': '[{"instruction": "识别并解释给定列表中的两个科学理论：细胞理论和日心说。", "input": "", "output": "细胞理论是生物科学的一个理论，它认为所有生命体都是由微小的基本单元——细胞所构成。这是生物学的一个基础理论，认为细胞是所"}, {"instruction": "输入三支篮球队的名称并生成一个适当的口号。", "input": "输入：俄克拉荷马城雷霆队，芝加哥公牛队，布鲁克林网队。", "output": "输出： \\"雷霆，公牛和网队：各显神通，角逐群雄!\\""}]',
    'glaive_toolcall_en_demo.json': '[{"conversations": [{"from": "human", "value": "Hi, I was born on 1990-05-15. Can you tell me how old I am t"}, {"from": "function_call", "value": "{\\"name\\": \\"calculate_age\\", \\"arguments\\": {\\"birthdate\\": \\"1990-0"}, {"from": "observation", "value": "{\\"age\\": 31}"}, {"from": "gpt", "value": "Based on the birthdate you provided, you are 31 years old to"}], "tools": "[{\\"name\\": \\"calculate_age\\", \\"description\\": \\"Calculate the age"}]',
    'glaive_toolcall_zh_demo.json': '[{"conversations": [{"from": "human", "value": "我无聊了。你能告诉我一些有趣的事情吗？"}, {"from": "function_call", "value": "{\\"name\\": \\"get_random_fact\\", \\"arguments\\": {}}"}, {"from": "observation", "value": "{\\"fact\\": \\"你知道章鱼有三个心脏吗？\\"}"}, {"from": "gpt", "value": "你知道吗，章鱼有三颗心脏？相当有趣，不是吗？"}], "tools": "[{\\"name\\": \\"get_random_fact\\", \\"description\\": \\"获取一个随机的有趣事实\\", \\""}]',
    'mllm_demo.json': '[{"messages": [{"content": "<image>Who are they?", "role": "user"}, {"content": "They\'re Kane and Gretzka from Bayern Munich.", "role": "assistant"}, {"content": "What are they doing?<image>", "role": "user"}, {"content": "They are celebrating on the soccer field.", "role": "assistant"}], "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]}, {"messages": [{"content": "<image>Who is he?", "role": "user"}, {"content": "He\'s Thomas Muller from Bayern Munich.", "role": "assistant"}, {"content": "Why is he on the ground?", "role": "user"}, {"content": "Because he\'s sliding on his knees to celebrate.", "role": "assistant"}], "images": ["mllm_demo_data/2.jpg"]}]',
    'mllm_audio_demo.json': '[{"messages": [{"content": "<audio>What\'s that sound?", "role": "user"}, {"content": "It is the sound of glass shattering.", "role": "assistant"}], "audios": ["mllm_demo_data/1.mp3"]}, {"messages": [{"content": "<audio>What can you hear?", "role": "user"}, {"content": "A woman is coughing.", "role": "assistant"}], "audios": ["mllm_demo_data/2.wav"]}]',
    'mllm_video_demo.json': '[{"messages": [{"content": "<video>Why is this video funny?", "role": "user"}, {"content": "Because a baby is reading, and he is so cute!", "role": "assistant"}], "videos": ["mllm_demo_data/1.mp4"]}, {"messages": [{"content": "<video>What is she doing?", "role": "user"}, {"content": "She is cooking.", "role": "assistant"}], "videos": ["mllm_demo_data/2.avi"]}]',
    'mllm_video_audio_demo.json': '[{"messages": [{"content": "<video><audio>What is the video describing?", "role": "user"}, {"content": "A girl who is drawing a picture of a guitar and feel nervous", "role": "assistant"}], "videos": ["mllm_demo_data/4.mp4"], "audios": ["mllm_demo_data/4.mp3"]}, {"messages": [{"content": "<video><audio>What does this girl say?", "role": "user"}, {"content": "She says: \'Hello! Take a look at what am I drawing!\'", "role": "assistant"}], "videos": ["mllm_demo_data/4.mp4"], "audios": ["mllm_demo_data/4.mp3"]}]',
    'dpo_en_demo.json': '[{"conversations": [{"from": "human", "value": "Hi! I\'d like to create a new language game simulating the fi"}], "chosen": {"from": "gpt", "value": "That sounds like a fun and engaging idea! Here are some tips"}, "rejected": {"from": "gpt", "value": "Hello! I\'d be happy to help you create a language game simul"}}, {"conversations": [{"from": "system", "value": "You are a teacher. Given a task, you explain in simple steps"}, {"from": "human", "value": "Q: In this task, you need to provide the parts-of-speech tag"}], "chosen": {"from": "gpt", "value": "In this task, you are asked to identify the part-of-speech ("}, "rejected": {"from": "gpt", "value": "Sure, I\'d be happy to help! Here are the steps to find the p"}}]',
    'dpo_zh_demo.json': '[{"conversations": [{"from": "human", "value": "国会的转发\\n美国国会由众议院和参议院组成，每两年换届一次（参议员任期为6年，但参议院选举是错位的，使得国会的组成仍然每两"}], "chosen": {"from": "gpt", "value": "计算推文的政党边际概率，我们可以使用以下代码：\\n```python\\ntweets[\'party\'] = tweets[\'"}, "rejected": {"from": "gpt", "value": "回答问题的第（a）部分，您可以通过首先使用groupby（）函数按政党对数据进行分组，然后计算每个组的转发数来计算政党的"}}, {"conversations": [{"from": "human", "value": "请提供一下对香港银行业的分析以及目前面临的挑战。"}], "chosen": {"from": "gpt", "value": "香港银行业长期以来一直是该城市金融服务业和整体经济的重要组成部分。其特点是健全的监管框架、大量银行和资本流动的便利。以下"}, "rejected": {"from": "gpt", "value": "香港的银行业面临着诸多挑战，如低利率、高房价和经济疲软。新冠疫情也给该行业带来了压力，企业和消费者都在艰难度日。一些分析"}}]',
    'kto_en_demo.json': '[{"messages": [{"content": "The Federal Trade Commission is going after spyware, bits of", "role": "user"}, {"content": "Ooh ooh ah ah! *giggle* Let me think... Ooh ooh ah ah! *gigg", "role": "assistant"}], "label": true}, {"messages": [{"content": "Develop a Java program that simulates a basic ATM system wit", "role": "user"}, {"content": "import java.sql.*;\\nimport java.util.Scanner;\\n\\npublic class B", "role": "assistant"}, {"content": "Explain the importance and role of transactions in database ", "role": "user"}, {"content": "Transactions play a critical role in maintaining the integri", "role": "assistant"}, {"content": "Elaborate on how the principles of ACID (Atomicity, Consiste", "role": "user"}, {"content": "ACID properties are essential to ensure the reliability and ", "role": "assistant"}], "label": false}]',
    'wiki_demo.txt': '["Anarchism is a political philosophy and movement that is sce", "Autism is a neurodevelopmental disorder characterized by dif"]',
    'c4_demo.jsonl': '[{"text": "Don’t think you need all the bells and whistles? No problem."}, {"text": "To the apparent surprise of everyone, the Walt Disney Compan"}]',
}


@pytest.fixture
def llamafactory(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps(LLAMAFACTORY_INFO, ensure_ascii=False))
    for name, rows in SAMPLES.items():
        rows = json.loads(rows)
        if name.endswith(".txt"):
            text = "\n".join(rows) + "\n"
        elif name.endswith(".jsonl"):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            text = json.dumps(rows, ensure_ascii=False, indent=2)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / "dataset_info.json"


@pytest.mark.parametrize("name", sorted(LLAMAFACTORY_INFO))
def test_every_local_llamafactory_entry_loads(llamafactory, name):
    examples = D.load_examples(D.DataSpec(llamafactory, name=name))
    assert examples
    for ex in examples:
        assert ex.text or any(m["role"] == "assistant" for m in ex.messages)


def test_pretraining_entries_are_text(llamafactory):
    c4 = D.load_examples(D.DataSpec(llamafactory, name="c4_demo"))
    assert [e.text for e in c4] == [r["text"] for r in json.loads(SAMPLES["c4_demo.jsonl"])]
    wiki = D.load_examples(D.DataSpec(llamafactory, name="wiki_demo"))
    assert [e.text for e in wiki] == json.loads(SAMPLES["wiki_demo.txt"]) and wiki[1].source.endswith(":2")


def test_tool_calls_keep_tools_and_roles(llamafactory):
    ex = D.load_examples(D.DataSpec(llamafactory, name="glaive_toolcall_en_demo"))[0]
    raw = json.loads(SAMPLES["glaive_toolcall_en_demo.json"])[0]
    assert ex.tools == raw["tools"]
    roles = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    assert [m["role"] for m in ex.messages] == [roles[t["from"]] for t in raw["conversations"]]
    rendered = D.conversation(ex)
    assert rendered[0]["role"] == "system" and raw["tools"] in rendered[0]["content"]
    assert D.as_dicts([ex])[0]["tools"] == raw["tools"]


def test_ranking_and_kto_entries(llamafactory):
    dpo = D.load_examples(D.DataSpec(llamafactory, name="dpo_en_demo"))
    raw = json.loads(SAMPLES["dpo_en_demo.json"])
    assert dpo[0].messages[-1] == {"role": "assistant", "content": raw[0]["chosen"]["value"]}
    kto = D.load_examples(D.DataSpec(llamafactory, name="kto_en_demo"))
    assert len(kto) == 1  # the record tagged false is not one to imitate


def test_registry_upload_is_checked_against_its_files(tmp_path):
    ws = tmp_path / "ws"
    rows = json.loads(SAMPLES["c4_demo.jsonl"])
    save_upload(ws, "c4_demo.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(), folder="lf")
    bad = {"c4_demo": {"file_name": "c4_demo.jsonl", "formatting": "sharegpt"}}
    with pytest.raises(WebError, match="c4_demo.jsonl:1: missing column 'conversations'"):
        save_upload(ws, "dataset_info.json", json.dumps(bad).encode(), folder="lf")
    assert not (ws / "datasets" / "lf" / "dataset_info.json").exists()
    good = {"c4_demo": LLAMAFACTORY_INFO["c4_demo"]}
    assert save_upload(ws, "dataset_info.json", json.dumps(good).encode(), folder="lf")["format"] == "registry"


def test_inside_refuses_escapes(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "out").symlink_to(tmp_path)
    for rel in ("../x", "/etc/passwd", "a/../../x", "out/x", ""):
        with pytest.raises(WebError):
            inside(tmp_path / "ws", rel)
    assert inside(tmp_path / "ws", "datasets/a.jsonl") == (tmp_path / "ws" / "datasets" / "a.jsonl").resolve()
