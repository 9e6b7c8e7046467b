"""`hublab webui`: the trainer in a browser — datasets, LoRA training with live progress, export to GGUF
and packages, evaluation and chat.

    hublab webui [--host 127.0.0.1] [--port 7860] [--workspace DIR] [--token T] [--models-dir DIR]

Chat and Evaluate see the shell's models (system.toml: the user's models dir over the embedded set, or
only --models-dir); an exported adapter becomes an expert there with "Install as expert" (webui_models).

Standard library only (http.server, Server-Sent Events, plain JS and CSS shipped as package data in
trainer/webui/): nothing is fetched at run time and nothing new is installed. Every action the page
takes is a `hublab ...` command line, shown before it runs and run as a detached job (webui_jobs), so
what the page does can be copied to a terminal, and a job goes on when the browser closes.

Safety: it listens on loopback by default; on any other address a token is required (generated and
printed when not given). State-changing requests need the `X-Hublab: 1` header (a cross-site form
cannot send it); uploads are size-limited and checked in full before anything is written; every path
a request names is resolved inside the workspace.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import secrets
import shlex
import shutil
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from hublab.runtime.errors import HublabError
from hublab.runtime.inputs import is_loopback
from hublab.runtime.serve import http_base

from . import webui_jobs
from . import webui_models
from .webui_data import WebError, check_name, inside

MAX_JSON = 1 << 20
STATIC = ("index.html", "app.js", "app.css")


def _exe(name: str) -> list[str]:
    """A console script of this environment, or `python -m` of its module when the script is absent."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"hublab": "hublab.cli", "torchrun": "torch.distributed.run"}[name]]


class App:
    """The WebUI's state: its workspace, the system config (models), token and limits. Route handlers read it."""

    def __init__(self, workspace: Path, token: str = "", models_dir: Path | None = None,
                 max_upload: int = 64 << 20, loopback: bool = True):
        self.ws = Path(workspace).expanduser().resolve()
        for sub in ("datasets", "runs", "exports", "bench", "jobs", "models"):
            (self.ws / sub).mkdir(parents=True, exist_ok=True)
        self.token = token
        self.models_dir = Path(models_dir).resolve() if models_dir else None  # explicit: the whole model set
        self.system, self.system_error = webui_models.system_config(self.models_dir)
        self.max_upload = max_upload
        self.loopback = loopback
        self._runtime = None
        self.context = None  # the router and knowledge packs over _runtime (made with it)
        self._runtime_lock = threading.Lock()

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.ws).as_posix()

    # -- training ------------------------------------------------------------------------------------

    def base_value(self, base: str) -> str:
        """A base is a model name, pypi:<package>, or a path inside the workspace (made absolute)."""
        if not base:
            raise WebError("base: give a model name, pypi:<package> or a model path inside the workspace")
        if base.startswith("pypi:") or ("/" not in base and not base.endswith(".gguf")
                                        and not (self.ws / base).exists()):
            return base
        return str(inside(self.ws, base))

    def train_plan(self, form: dict) -> dict:
        """The TOML and the command a training form turns into (nothing written)."""
        from .train import DATA_KEYS, SCHEMA

        name = check_name(str(form.get("name") or ""), "run name")
        run_dir = inside(self.ws, f"runs/{name}")
        values = form.get("train", {}) or {}
        lora = form.get("lora", {}) or {}
        lines = ["# written by hublab webui; train it with the command below", "[train]"]
        for key, spec in SCHEMA["train"].items():
            if key == "base":
                value = self.base_value(str(values.get("base", "")))
            elif key == "output":
                value = str(run_dir / "out")
            else:
                value = values.get(key, spec.default)
            lines.append(f"{key} = {_toml(value, spec.type)}")
        lines.append("\n[lora]")
        for key, spec in SCHEMA["lora"].items():
            value = lora.get(key, spec.default)
            if key == "init" and value:  # an adapter to start from: one in the workspace, like the data
                value = str(inside(self.ws, str(value)))
            lines.append(f"{key} = {_toml(value, spec.type)}")
        data = form.get("data") or []
        if not data:
            raise WebError("data: choose at least one dataset")
        for d in data:
            lines.append("\n[[data]]")
            lines.append(f"path = {_toml(str(inside(self.ws, str(d.get('path', '')))), str)}")
            for key in ("ratio", "format", "name"):
                if d.get(key) not in (None, ""):
                    lines.append(f"{key} = {_toml(d[key], DATA_KEYS[key].type)}")
        export = form.get("export") or {}
        if export.get("adapter"):
            out = inside(self.ws, f"exports/{check_name(str(export['adapter']), 'adapter file')}")
            lines += ["\n[export]", f"adapter = {_toml(str(out), str)}",
                      f"outtype = {_toml(export.get('outtype', 'q8_0'), str)}"]
        toml_text = "\n".join(lines) + "\n"
        config = run_dir / "expert.toml"
        nproc = int(form.get("nproc", 1) or 1)
        if not 1 <= nproc <= 64:
            raise WebError("nproc: give 1 to 64 processes")
        if nproc > 1:
            argv = [*_exe("torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "hublab.trainer.train",
                    "expert", str(config)]
        else:
            argv = [*_exe("hublab"), "train", "expert", str(config)]
        if form.get("max_steps_override"):
            argv += ["--max-steps", str(int(form["max_steps_override"]))]
        return {"name": name, "toml": toml_text, "argv": argv, "command": shlex.join(argv),
                "config": self.rel(config) if config.exists() else f"runs/{name}/expert.toml"}

    def start_training(self, form: dict) -> dict:
        """Check the TOML the way `hublab train expert` reads it, then write it and start the run."""
        from hublab.runtime.config import ConfigError

        from .train import load_config

        plan = self.train_plan(form)
        run_dir = self.ws / "runs" / plan["name"]
        tmp = inside(self.ws, f".tmp/{plan['name']}-{secrets.token_hex(4)}.toml")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(plan["toml"])
        try:
            load_config(tmp)
        except ConfigError as exc:
            raise WebError(str(exc).replace(str(tmp), "expert.toml"), 422) from None
        finally:
            tmp.unlink(missing_ok=True)
        running = [j for j in webui_jobs.all_jobs(self.ws) if j.kind == "train" and j.name == plan["name"]
                   and webui_jobs.status(j) == "running"]
        if running:
            raise WebError(f"run {plan['name']!r} is training (job {running[0].id}); stop it first", 409)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "expert.toml").write_text(plan["toml"])
        outputs = [f"runs/{plan['name']}/out"]
        job = webui_jobs.start(self.ws, "train", plan["name"], [plan["argv"]], config=form, outputs=outputs)
        return webui_jobs.progress(job)

    def resume(self, job: webui_jobs.Job, max_steps: int = 0) -> dict:
        if job.kind != "train":
            raise WebError(f"job {job.id} is a {job.kind} job; only trainings resume")
        if webui_jobs.status(job) == "running":
            raise WebError(f"job {job.id} is still running", 409)
        argv = [a for a in job.commands[-1]]
        if "--max-steps" in argv:
            i = argv.index("--max-steps")
            del argv[i:i + 2]
        if max_steps:
            argv += ["--max-steps", str(int(max_steps))]
        new = webui_jobs.start(self.ws, "train", job.name, [argv], config={**job.config, "resumed_from": job.id},
                      outputs=job.outputs)
        return webui_jobs.progress(new)

    # -- export ---------------------------------------------------------------------------------------

    def export_plan(self, form: dict) -> tuple[str, list[list[str]], list[str]]:
        """(job name, commands, outputs) of an export form; every path inside the workspace."""
        from .export import QUANT_TYPES

        kind = form.get("kind", "")
        out_name = check_name(str(form.get("out") or ""), "output name")
        hub = _exe("hublab")
        src = inside(self.ws, str(form.get("source") or ""))
        if not src.exists():
            raise WebError(f"{form.get('source')}: not found in the workspace", 404)
        cal = []
        if form.get("calibration"):
            cal = ["--calibration", str(inside(self.ws, form["calibration"])),
                   "--model-dir", str(inside(self.ws, str(form.get("model_dir") or "")))]
        threads = ["--threads", str(int(form.get("threads") or 0))]
        if kind == "adapter":
            out = inside(self.ws, f"exports/{out_name}" + ("" if out_name.endswith(".gguf") else ".gguf"))
            cmd = [*hub, "export", "adapter", str(src), "-o", str(out), "--outtype", form.get("outtype", "q8_0")]
            if form.get("base_gguf"):
                cmd += ["--base-gguf", str(inside(self.ws, form["base_gguf"]))]
            return out_name, [cmd], [self.rel(out)]
        if kind == "merge":
            out = inside(self.ws, f"exports/{out_name}")
            return out_name, [[*hub, "export", "merge", str(src), "-o", str(out), "--dtype",
                               form.get("dtype", "float16")]], [self.rel(out)]
        if kind == "gguf":
            out = inside(self.ws, f"exports/{out_name}" + ("" if out_name.endswith(".gguf") else ".gguf"))
            return out_name, [[*hub, "export", "gguf", str(src), "-o", str(out), "--outtype",
                               form.get("outtype", "f16")]], [self.rel(out)]
        if kind == "quantize":
            types = [t for t in form.get("types", []) if t in QUANT_TYPES]
            if not types:
                raise WebError(f"types: choose one or more of {', '.join(QUANT_TYPES)}")
            out = inside(self.ws, f"exports/{out_name}")
            return out_name, [[*hub, "export", "quantize", str(src), "--types", ",".join(types), "-o", str(out),
                               *cal, *threads]], [self.rel(out)]
        if kind in ("profiles", "package"):
            out = inside(self.ws, f"exports/{out_name}")
            cmds = []
            if kind == "profiles":
                profiles = [p for p in form.get("profiles", []) if isinstance(p, str) and p]
                if not profiles:
                    raise WebError("profiles: choose at least one board")
                cmd = [*hub, "export", "profiles", str(src), "--profiles", ",".join(profiles), "-o", str(out),
                       *cal, *threads]
                for key in ("name", "version", "description", "license"):
                    if form.get(key):
                        cmd += [f"--{key}", str(form[key])]
                if form.get("unsigned"):
                    cmd.append("--no-sign")
                cmds.append(cmd)
            else:  # an existing package directory: build (and sign) it in place
                out = src
                cmds.append([*hub, "pkg", "build", str(src), *(["--unsigned"] if form.get("unsigned") else [])])
            if form.get("publish"):
                reg = str(form.get("registry") or "")
                if reg and "://" not in reg:
                    reg = str(inside(self.ws, reg))
                cmds.append([*hub, "pkg", "publish", str(out), *(["--registry", reg] if reg else [])])
            return out_name, cmds, [self.rel(out)]
        raise WebError(f"kind {kind!r}: use adapter, merge, gguf, quantize, profiles or package")

    # -- evaluation and chat --------------------------------------------------------------------------

    def catalog(self):
        """The models the shell sees: the loaded runtime's catalog, else a fresh scan."""
        from hublab.runtime.config import scan_models

        if self._runtime is not None:
            return self._runtime.catalog
        return scan_models(self.system.model_dirs)

    def models(self) -> dict:
        catalog = self.catalog()
        errors = [e for e in catalog.errors if "models directory not found" not in e or self.models_dir]
        if self.system_error:
            errors.insert(0, self.system_error)
        return {"models": webui_models.describe(catalog), "errors": errors,
                "dirs": [str(d) for d in self.system.model_dirs], "install_dir": str(self.system.models_dir)}

    def runtime(self):
        with self._runtime_lock:
            if self._runtime is None:
                from hublab.runtime.engine.runtime import Runtime
                from hublab.runtime.routing.context import ExpertContext

                self._runtime = Runtime(system=self.system)
                self.context = ExpertContext(self._runtime)  # chat answers get the experts' knowledge, as on a device
            return self._runtime

    def install_plan(self, form: dict) -> dict:
        return webui_models.install_plan(self.ws, self.catalog(), self.system.models_dir, form)

    def install(self, form: dict) -> dict:
        """Install an exported adapter as an expert; Chat and Evaluate list it at once."""
        plan = self.install_plan(form)
        webui_models.install(plan, self.system, replace=bool(form.get("replace")))
        with self._runtime_lock:
            if self._runtime is not None:
                self._runtime.rescan()
        return {k: plan[k] for k in ("name", "base", "path", "adapter_path", "base_toml", "shadows", "toml")}

    def bench_plan(self, form: dict) -> tuple[list[list[str]], str]:
        expert = str(form.get("expert") or "")
        experts = [m["name"] for m in self.models()["models"] if m["expert"]]
        if expert not in experts:
            raise WebError(f"expert {expert!r}: not installed; choose one of {', '.join(experts) or '(none)'}, "
                           "or install a run's adapter with Export's Install as expert", 404)
        questions = inside(self.ws, str(form.get("questions") or ""))
        if not questions.is_file():
            raise WebError(f"{form.get('questions')}: no such question file in the workspace", 404)
        out = f"bench/{check_name(str(form.get('out') or expert + '-ab'), 'output name')}"
        cmd = [*_exe("hublab"), "bench", "ab", "--questions", str(questions), "--expert", expert,
               *(["--models-dir", str(self.models_dir)] if self.models_dir else []),
               "--out", str(inside(self.ws, out)), "--max-tokens", str(int(form.get("max_tokens") or 64))]
        if form.get("base"):
            cmd += ["--base", str(form["base"])]
        return [cmd], out

    def bench_result(self, job: webui_jobs.Job) -> dict:
        """A/B answers side by side, each with runtime.quality's key-term hit and degenerate check."""
        from hublab.runtime.routing import quality

        out = inside(self.ws, job.outputs[0])
        summary_path = out / "summary.json"
        rows: dict[str, dict] = {}
        for side in ("base", "expert"):
            path = out / f"answers_{side}.jsonl"
            if not path.exists():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                a = json.loads(line)
                row = rows.setdefault(a["question"], {"question": a["question"], "terms": a.get("terms", [])})
                row[side] = {"answer": a["answer"], "mentions": a.get("mentions", 0),
                             "tokens_per_s": a.get("tokens_per_s"),
                             "hit": quality.hit(a["answer"], a.get("terms", [])),
                             "degenerate": quality.degenerate(a["answer"])}
        return {"summary": json.loads(summary_path.read_text()) if summary_path.exists() else None,
                "rows": list(rows.values())}

    def chat(self, body: dict) -> dict:
        self.runtime()  # opened on first use, with the experts' context
        model = str(body.get("model") or "")
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise WebError("messages: give a list of {role: system|user|assistant, content}")
        res = self.context.generate(model, messages,
                                    max_tokens=max(1, min(1024, int(body.get("max_tokens") or 128))))
        return {"model": model, "text": res.text, "tokens": res.tokens, "tokens_per_s": round(res.tokens_per_s, 1)}

    def info(self) -> dict:
        from hublab.runtime import chat
        from hublab.runtime.engine.profiles import board_profiles

        from . import data
        from .export import NEEDS_IMATRIX, QUANT_TYPES
        from .lora import LORA_TARGETS
        from .train import SCHEMA

        try:
            from hublab.runtime.pkg import configured_registry

            registry = configured_registry()
        except (HublabError, OSError):
            registry = ""
        try:
            from .demo_data import DOC_PAIRS

            domains = list(DOC_PAIRS)
        except ImportError:
            domains = []
        bases = webui_models.train_bases(self.ws)
        schema = {sec: {k: {"default": s.default, "help": s.help, "type": s.type.__name__,
                            "choices": list(s.choices) if getattr(s, "choices", None) else None}
                        for k, s in keys.items()} for sec, keys in SCHEMA.items()}
        if bases and not schema["train"]["base"]["default"]:
            schema["train"]["base"]["default"] = bases[0]["value"]  # the embedded base: a run that starts as is
        return {"workspace": str(self.ws), "schema": schema, "formats": list(data.FORMATS),
                "templates": ["auto", *chat.TEMPLATES], "lora_targets": LORA_TARGETS,
                "quant_types": list(QUANT_TYPES), "needs_imatrix": sorted(NEEDS_IMATRIX),
                "profiles": sorted(board_profiles()), "registry": registry, "domains": domains,
                "bases": bases, "models_dirs": [str(d) for d in self.system.model_dirs],
                "install_dir": str(self.system.models_dir), "max_upload": self.max_upload}


def _toml(value, kind) -> str:
    """One TOML value of the schema's type (strings JSON-quoted: a valid TOML basic string)."""
    try:
        if kind is bool:
            v = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            return "true" if v else "false"
        if kind is int:
            return str(int(value))
        if kind is float:
            return repr(float(value))
        if kind is list:
            items = value if isinstance(value, list) else [t.strip() for t in str(value).split(",") if t.strip()]
            return "[" + ", ".join(json.dumps(str(t)) for t in items) + "]"
    except (TypeError, ValueError):
        raise WebError(f"{value!r}: not a valid {kind.__name__}") from None
    return json.dumps(str(value), ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------
# HTTP

class Handler(http_base.Handler):
    """One WebUI request (runtime/serve/http_base.py reads bodies and sends JSON and streams for it and the agent)."""
    server_version = "hublab-webui"
    app: App  # set on the subclass made by make_server
    max_body = MAX_JSON

    def log_message(self, fmt, *args):  # quiet; jobs have their own logs
        pass

    # -- plumbing ---------------------------------------------------------------------------------

    def json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        super().json(obj, status, {"Cache-Control": "no-store", **(headers or {})})

    def error(self, status: int, message: str) -> None:
        self.json({"error": message}, status)

    def upload(self) -> bytes:
        return self.read_body(self.app.max_upload, "upload of {length} bytes is over the limit of {limit} bytes; "
                                                   "split the file or start hublab webui with a larger --max-upload-mb")

    def authorized(self, query: dict) -> tuple[bool, dict]:
        """(allowed, extra headers): loopback Host check, then the token (header, cookie or ?token=)."""
        app = self.app
        if app.loopback and not http_base.names_loopback(self.headers.get("Host") or ""):
            return False, {}  # DNS rebinding: a page on another name must not reach a loopback UI
        if not app.token:
            return True, {}
        given = http_base.bearer_token(self.headers)
        for part in (self.headers.get("Cookie") or "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "hublab_token" and not given:
                given = v
        extra = {}
        if not given and query.get("token"):
            given = query["token"][0]
            extra["Set-Cookie"] = f"hublab_token={given}; HttpOnly; SameSite=Strict; Path=/"
        return http_base.token_matches(given, app.token), extra

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        ok, extra = self.authorized(query)
        if not ok:
            return self.error(401, "token required: open the URL hublab webui printed (it ends in ?token=...)")
        if method in ("POST", "PUT", "DELETE") and self.headers.get("X-Hublab") != "1":
            return self.error(403, "send the X-Hublab: 1 header (the page does); cross-site requests are refused")
        parts = [p for p in url.path.split("/") if p]
        try:
            if len(parts) >= 3 and parts[:2] == ["api", "jobs"]:
                return self.job_route(method, parts[2:], query)
            route = ROUTES.get((method, parts[0] if parts else "", parts[1] if len(parts) > 1 else ""))
            if route is None:
                return self.error(404, f"{url.path}: no such page")
            return route(self, parts, query, extra)
        except WebError as exc:
            self.error(exc.status, str(exc))
        except http_base.HttpError as exc:
            self.error(exc.status, exc.message)
        except HublabError as exc:
            self.error(422, str(exc).replace(str(self.app.ws) + "/", ""))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    # -- routes ------------------------------------------------------------------------------------

    def page(self, parts, query, extra):
        name = "index.html" if not parts else parts[-1]
        if name not in STATIC:
            return self.error(404, f"{name}: no such file")
        body = resources.files("hublab.trainer").joinpath("webui", name).read_bytes()
        self.send(200, body, mimetypes.guess_type(name)[0] or "text/plain",
                  {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:", **extra})

    def api_info(self, parts, query, extra):
        self.json(self.app.info())

    def api_datasets(self, parts, query, extra):
        from . import webui_data

        self.json(webui_data.list_datasets(self.app.ws))

    def api_upload(self, parts, query, extra):
        from . import webui_data

        body = self.upload()
        q = {k: v[0] for k, v in query.items()}
        self.json(webui_data.save_upload(self.app.ws, q.get("file", ""), body, q.get("folder", ""),
                                     q.get("format", "auto")), 201)

    def api_inspect(self, parts, query, extra):
        from . import webui_data

        q = {k: v[0] for k, v in query.items()}
        base = q.get("base", "")
        self.json(webui_data.inspect(self.app.ws, q.get("path", ""), q.get("name", ""), q.get("format", "auto"),
                                 self.app.base_value(base) if base else "", q.get("template", "chatml"),
                                 int(q.get("rows", 5))))

    def api_mix(self, parts, query, extra):
        from . import webui_data

        b = self.body()
        self.json(webui_data.mix_datasets(self.app.ws, str(b.get("name", "")), b.get("parts") or [],
                                      int(b.get("total") or 0), int(b.get("seed") or 0)), 201)

    def api_generate(self, parts, query, extra):
        from . import webui_data

        b = self.body()
        self.json(webui_data.generate(self.app.ws, str(b.get("domain", "")), str(b.get("name", "")),
                                  int(b.get("limit") or 0)), 201)

    def api_train(self, parts, query, extra):
        b = self.body()
        if len(parts) > 2 and parts[2] == "plan":
            return self.json(self.app.train_plan(b))
        self.json(self.app.start_training(b), 201)

    def api_export(self, parts, query, extra):
        b = self.body()
        name, cmds, outputs = self.app.export_plan(b)
        if len(parts) > 2 and parts[2] == "plan":
            return self.json({"commands": [shlex.join(c) for c in cmds], "outputs": outputs})
        job = webui_jobs.start(self.app.ws, "export", name, cmds, config=b, outputs=outputs)
        self.json(webui_jobs.progress(job), 201)

    def api_bench(self, parts, query, extra):
        b = self.body()
        cmds, out = self.app.bench_plan(b)
        job = webui_jobs.start(self.app.ws, "bench", b.get("expert", "bench"), cmds, config=b, outputs=[out])
        self.json(webui_jobs.progress(job), 201)

    def api_chat(self, parts, query, extra):
        self.json(self.app.chat(self.body()))

    def api_models(self, parts, query, extra):
        self.json(self.app.models())

    def api_install(self, parts, query, extra):
        app = self.app
        if self.command == "GET":
            adapter = query.get("adapter", [""])[0]
            return self.json(webui_models.install_defaults(app.ws, app.catalog(), app.system.models_dir, adapter))
        b = self.body()
        if len(parts) > 2 and parts[2] == "plan":
            plan = app.install_plan(b)
            return self.json({k: plan[k] for k in ("name", "base", "path", "toml", "base_toml", "exists",
                                                        "shadows")})
        self.json(app.install(b), 201)

    def api_jobs(self, parts, query, extra):
        kind = query.get("kind", [""])[0]
        out = []
        for job in webui_jobs.all_jobs(self.app.ws):
            if kind and job.kind != kind:
                continue
            p = webui_jobs.progress(job, log_lines=0)
            p.pop("log")
            out.append(p)
        self.json(out)

    def api_files(self, parts, query, extra):
        rel = query.get("path", ["exports"])[0]
        root = inside(self.app.ws, rel)
        if not root.is_dir():
            raise WebError(f"{rel}: not a folder of the workspace", 404)
        files = [{"path": self.app.rel(p), "size": p.stat().st_size} for p in sorted(root.rglob("*"))
                 if p.is_file() and not p.name.startswith(".")][:2000]
        for f in files:  # an adapter GGUF can be installed as an expert
            f["adapter"] = f["path"].endswith(".gguf") and webui_models.gguf_kind(self.app.ws / f["path"]) == "adapter"
        self.json(files)

    def download(self, parts, query, extra):
        rel = "/".join(unquote(p) for p in parts[1:])
        path = inside(self.app.ws, rel)
        if not path.is_file():
            raise WebError(f"{rel}: no such file in the workspace", 404)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(path.name)}")
        self.end_headers()
        with open(path, "rb") as f:
            shutil.copyfileobj(f, self.wfile)

    def job_route(self, method, rest, query):
        try:
            job = webui_jobs.load(self.app.ws, rest[0])
        except KeyError:
            raise WebError(f"job {rest[0]!r}: no such job", 404) from None
        action = rest[1] if len(rest) > 1 else ""
        if method == "GET" and action == "":
            return self.json(webui_jobs.progress(job, int(query.get("lines", ["40"])[0])))
        if method == "GET" and action == "events":
            return self.events(job)
        if method == "GET" and action == "bench":
            return self.json(self.app.bench_result(job))
        if method == "GET" and action == "toml" and job.kind == "train":
            return self.json({"toml": inside(self.app.ws, f"runs/{job.name}/expert.toml").read_text()})
        if method == "POST" and action == "stop":
            return self.json({"stopped": webui_jobs.stop(job), **webui_jobs.progress(job)})
        if method == "POST" and action == "resume":
            b = self.body()
            return self.json(self.app.resume(job, int(b.get("max_steps") or 0)), 201)
        raise WebError(f"{action!r}: no such job action", 404)

    def events(self, job: webui_jobs.Job) -> None:
        """Server-Sent Events: the job's progress whenever it changes, until it ends or the page goes away."""
        last, last_sent = "", time.monotonic()
        while not self.gone:
            p = webui_jobs.progress(job, 60)
            text = json.dumps(p)
            if text != last:
                self.sse(text)
                last, last_sent = text, time.monotonic()
            elif time.monotonic() - last_sent > 15:
                self.write_frame(b": ping\n\n")
                last_sent = time.monotonic()
            if p["status"] != "running":
                self.sse("{}", event="end")
                return
            time.sleep(0.5)


ROUTES = {
    ("GET", "", ""): Handler.page,
    ("GET", "static", ""): Handler.page,
    ("GET", "api", "info"): Handler.api_info,
    ("GET", "api", "datasets"): Handler.api_datasets,
    ("PUT", "api", "datasets"): Handler.api_upload,
    ("GET", "api", "inspect"): Handler.api_inspect,
    ("POST", "api", "mix"): Handler.api_mix,
    ("POST", "api", "generate"): Handler.api_generate,
    ("POST", "api", "train"): Handler.api_train,
    ("POST", "api", "export"): Handler.api_export,
    ("POST", "api", "bench"): Handler.api_bench,
    ("POST", "api", "chat"): Handler.api_chat,
    ("GET", "api", "models"): Handler.api_models,
    ("GET", "api", "install"): Handler.api_install,
    ("POST", "api", "install"): Handler.api_install,
    ("GET", "api", "jobs"): Handler.api_jobs,
    ("GET", "api", "files"): Handler.api_files,
    ("GET", "files", ""): Handler.download,
}


class _Routes(dict):
    """Routes keyed by (method, first, second path part); '/static/x' and '/files/...' match on the first."""

    def get(self, key, default=None):
        method, first, second = key
        if (method, first, second) in self:
            return self[(method, first, second)]
        if first in ("static", "files", "") and (method, first, "") in self:
            return self[(method, first, "")]
        return default


ROUTES = _Routes(ROUTES)


def make_server(workspace: Path, host: str = "127.0.0.1", port: int = 7860, token: str = "",
                models_dir: Path | None = None, max_upload_mb: float = 64) -> tuple[ThreadingHTTPServer, App]:
    """A ready (not yet serving) server and its App; off loopback a token is required."""
    loopback = is_loopback(host)
    if not loopback and not token:
        raise WebError(f"--host {host}: listening off loopback needs a token; pass --token or let webui make one")
    app = App(workspace, token, models_dir, int(max_upload_mb * (1 << 20)), loopback)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server, app


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--workspace", type=Path, default=Path("hublab-workspace"),
                        help="folder holding datasets, runs, exports (default ./hublab-workspace)")
    parser.add_argument("--token", default="", help="access token (required off loopback; made up when not given)")
    parser.add_argument("--models-dir", type=Path, help="the only models dir for chat, the A/B bench and "
                        "Install as expert (default: the shell's: the user's models dir over the embedded set)")
    parser.add_argument("--max-upload-mb", type=float, default=64, help="largest dataset upload (default 64)")


def cli(args: argparse.Namespace) -> int:
    token = args.token
    if not is_loopback(args.host) and not token:
        token = secrets.token_urlsafe(18)
    server, app = make_server(args.workspace, args.host, args.port, token, args.models_dir, args.max_upload_mb)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{server.server_address[1]}/" + (f"?token={token}" if token else "")
    print(f"hublab webui: {url}  (workspace {app.ws}; Ctrl-C stops the page, jobs go on)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
