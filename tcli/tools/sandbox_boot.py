"""The sandboxed worker: run as a script by ``tcli.tools.sandbox`` in a separate interpreter, never
imported by tcli. It reads one JSON request on stdin, lowers its resource limits, moves into its
temporary directory, installs an audit hook and runs the model's code (or a plugin function).

Exit status: 0 done, 1 the code raised (traceback printed), 3 out of memory, 4 the plugin
returned something that is not a string; a plugin's answer is one JSON object on stdout.
Only the standard library is imported here, and only before the hook is in place.
"""

import json
import linecache
import os
import resource
import sys
import traceback

EXIT_RAISED, EXIT_MEMORY, EXIT_NOT_STR = 1, 3, 4
REFUSED_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                  "subprocess.Popen", "pty.spawn", "gc.get_objects", "gc.get_referrers",
                  "gc.get_referents", "sys.settrace", "sys.setprofile")
# native back doors, and C modules that open files themselves (the "open" hook never sees it)
REFUSED_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess", "cffi", "_testcapi",
                   "_testinternalcapi", "_xxsubinterpreters", "multiprocessing",
                   "_multiprocessing", "_posixshmem", "_dbm", "_gdbm", "readline", "_ssl")
WRITE_EVENTS = ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink",
                "os.chmod", "os.chown", "os.utime", "os.truncate", "os.chflags", "os.lchflags",
                "os.setxattr", "os.removexattr", "os.chdir", "shutil.rmtree", "os.mkfifo",
                "os.mknod")
READ_EVENTS = ("os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "glob.glob")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def set_limits(lim):
    """Lower every limit (never above the hard limit already in place); one the platform refuses
    is skipped (macOS accepts RLIMIT_AS but does not enforce it; docs/design.md §9.4)."""
    cpu = int(lim["cpu_seconds"])
    for name, soft, hard in (("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", lim["memory_bytes"], None),
                             ("RLIMIT_FSIZE", lim["file_bytes"], None),
                             ("RLIMIT_NPROC", lim["processes"], None),
                             ("RLIMIT_NOFILE", lim["open_files"], None), ("RLIMIT_CORE", 0, None)):
        which = getattr(resource, name, None)
        if which is None:
            continue
        soft, hard = int(soft), int(soft if hard is None else hard)
        cap = resource.getrlimit(which)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


def make_hook(tmp, read_roots):
    """The audit hook: files under ``tmp`` only (and read-only under the standard library), no
    processes, sockets or native code. Its state lives in this closure, referenced by nothing
    the code can reach."""
    import pathlib

    realpath, fspath, own_pid = os.path.realpath, os.fspath, os.getpid()
    plain_paths = (str, bytes, pathlib.PurePosixPath, pathlib.PosixPath)
    extra_read, extra_rw = ("/dev/urandom",), ("/dev/null",)

    def under(p, roots):
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def check_path(path, write):
        if isinstance(path, int):
            return  # an fd already opened
        if type(path) not in plain_paths:
            raise PermissionError("sandbox: paths must be str, bytes or pathlib paths")
        p = fspath(path)
        p = realpath(p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else p)
        if under(p, (tmp,)) or p in extra_rw or (not write and (under(p, read_roots)
                                                                  or p in extra_read)):
            return
        raise PermissionError(f"sandbox: {'writing' if write else 'reading'} {p} is not allowed; "
                              "only the working directory is")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            write = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
            check_path(path, write)
        elif event in WRITE_EVENTS:
            for a in args[:2] if event in ("os.rename", "os.link") else args[:1]:
                if a is not None:
                    check_path(a, True)
            if event == "os.symlink":
                check_path(args[1], True)
        elif event == "sqlite3.connect":
            if args[0] not in (":memory:", "", b":memory:", b""):
                check_path(args[0], True)
        elif event in READ_EVENTS:
            if args and args[0] is not None:
                check_path(args[0], False)
        elif event in REFUSED_EVENTS or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import" and args[0].split(".")[0] in REFUSED_IMPORTS:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill") and args[0] != own_pid:
            raise PermissionError(f"sandbox: {event} is not allowed")

    return hook


def show_error(exc, code_name):
    """The traceback of the model's code: the frames of this script (the runner, the hook) are
    not shown."""
    here = os.path.realpath(__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.realpath(f.filename) != here]
    text = "".join(traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc))
    sys.stderr.write("Traceback (most recent call last):\n" + text if frames else text)


def run_code(code):
    name = "<python>"
    lines = code.splitlines(keepends=True)
    linecache.cache[name] = (len(code), None, lines, name)
    main = type(sys)("__main__")
    sys.modules["__main__"] = main
    try:
        exec(compile(code, name, "exec"), main.__dict__)
    except SystemExit as e:
        if e.code not in (None, 0):
            print(f"SystemExit: {e.code}", file=sys.stderr)
            return EXIT_RAISED
    except MemoryError:
        print("MemoryError: out of memory", file=sys.stderr)
        return EXIT_MEMORY
    except BaseException as e:  # noqa: BLE001 - the model's error is the answer
        show_error(e, name)
        return EXIT_RAISED
    return 0


def answer(fd, obj):
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(fd, data):]


def run_plugin(fn, arguments, max_chars, out_fd):
    try:
        result = fn(arguments)
    except MemoryError:
        answer(out_fd, {"ok": False, "error": "MemoryError: out of memory"})
        return EXIT_MEMORY
    except BaseException as e:  # noqa: BLE001 - SystemExit too: a plugin does not end the worker
        msg = " ".join(str(e).split())[:500]
        answer(out_fd, {"ok": False, "error": f"{type(e).__name__}: {msg}" if msg
                        else type(e).__name__})
        return EXIT_RAISED
    if not isinstance(result, str):
        answer(out_fd, {"ok": False, "error": f"returned {type(result).__name__}, not str"})
        return EXIT_NOT_STR
    answer(out_fd, {"ok": True, "result": result[:max_chars], "truncated": len(result) > max_chars})
    return 0


def load_plugin(req):
    import importlib

    sys.path[:0] = req["path"]
    fn = getattr(importlib.import_module(req["module"]), req["function"], None)
    if not callable(fn):
        raise AttributeError(f"module {req['module']!r} has no function {req['function']!r}")
    return fn


def quiet_stdout():
    """A plugin's prints (also at import) go nowhere; its answer goes to the returned fd."""
    out_fd, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    return out_fd


def main():
    req = json.loads(sys.stdin.buffer.read())
    os.close(0)
    set_limits(req["limits"])
    os.chdir(req["tmp"])
    read_roots = tuple(os.path.realpath(p) for p in sys.path if p)
    fn = out_fd = None
    if req["mode"] in ("plugin", "check"):
        out_fd = quiet_stdout()
        try:
            fn = load_plugin(req)
        except BaseException as e:  # noqa: BLE001 - reported to the parent as a usage error
            answer(out_fd, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            return EXIT_RAISED
        if req["mode"] == "check":
            answer(out_fd, {"ok": True, "doc": (fn.__doc__ or "").strip().split("\n")[0]})
            return 0
    sys.addaudithook(make_hook(os.path.realpath(req["tmp"]), read_roots))
    if fn is not None:
        return run_plugin(fn, req["arguments"], req["limits"]["output_bytes"], out_fd)
    return run_code(req["code"])


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(
        os.path.realpath(__file__))]
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
