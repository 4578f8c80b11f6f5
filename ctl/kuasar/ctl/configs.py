"""Pod and container configurations from crictl-style JSON files and/or command-line flags.

The files are the protobuf JSON form of `runtime.v1.PodSandboxConfig` / `ContainerConfig`, the same
files `crictl runp pod.json` and `crictl create POD container.json pod.json` read (field names in
either snake_case or lowerCamelCase). Flags override what a file says.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf import json_format

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.state import write_atomic

# kubelet's layout: /var/log/pods/<namespace>_<name>_<uid>/<container>/<attempt>.log
LOG_ROOT = "/var/log/pods"


class ConfigError(Exception):
    pass


def load_message(path: str | Path, message: json_format.Message) -> json_format.Message:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # a ValueError, but not JSON's
        raise ConfigError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    if not isinstance(parsed, dict):  # protobuf's parser walked a string's characters, silently
        raise ConfigError(f"{path}: not a runtime.v1.{type(message).__name__}: a JSON object is needed, "
                          f"not a {type(parsed).__name__}")
    try:
        return json_format.Parse(text, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ConfigError(f"{path}: not a runtime.v1.{type(message).__name__}: {exc}") from None


def parse_pairs(values: Sequence[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {value!r} is not KEY=VALUE")
        pairs[key] = val
    return pairs


def pod_config(path: str | None = None, *, name: str | None = None, namespace: str | None = None,
               uid: str | None = None, attempt: int | None = None, hostname: str | None = None,
               host_network: bool | None = None, log_directory: str | None = None,
               cgroup_parent: str | None = None, share_pid: bool | None = None,
               labels: Mapping[str, str] | None = None,
               annotations: Mapping[str, str] | None = None) -> cri.PodSandboxConfig:
    """A PodSandboxConfig: the file's, then each given flag on top; what is still missing gets
    kubelet's defaults (a fresh uid, /var/log/pods/<ns>_<name>_<uid>, host network unless a file or
    --pod-network says otherwise)."""
    config = cri.PodSandboxConfig()
    if path:
        load_message(path, config)
    meta = config.metadata
    if name is not None:
        meta.name = name
    if namespace is not None:
        meta.namespace = namespace
    if uid is not None:
        meta.uid = uid
    if attempt is not None:
        meta.attempt = attempt
    if not meta.name:
        raise ConfigError("the pod needs a name (--name, or metadata.name in the config file)")
    meta.namespace = meta.namespace or "default"
    meta.uid = meta.uid or uuid.uuid4().hex
    ns = config.linux.security_context.namespace_options
    if host_network is not None or not path:
        ns.network = cri.NODE if (host_network is None or host_network) else cri.POD
    if share_pid is not None:
        ns.pid = cri.POD if share_pid else cri.CONTAINER
    elif not path:
        ns.pid = cri.CONTAINER  # kubelet's default; the proto zero value would be POD
    if hostname is not None:
        config.hostname = hostname
    elif not config.hostname and ns.network != cri.NODE:
        config.hostname = meta.name
    if log_directory is not None:
        config.log_directory = log_directory
    elif not config.log_directory:
        config.log_directory = f"{LOG_ROOT}/{meta.namespace}_{meta.name}_{meta.uid}"
    if cgroup_parent is not None:
        config.linux.cgroup_parent = cgroup_parent
    config.labels.update(labels or {})
    config.annotations.update(annotations or {})
    return config


def container_config(path: str | None = None, *, name: str | None = None, image: str | None = None,
                     command: Sequence[str] = (), env: Mapping[str, str] | None = None,
                     workdir: str | None = None, tty: bool | None = None, stdin: bool | None = None,
                     labels: Mapping[str, str] | None = None, log_path: str | None = None,
                     pod: cri.PodSandboxConfig | None = None) -> cri.ContainerConfig:
    """A ContainerConfig: the file's, then the flags; the command replaces the file's command+args.

    Namespace options left unset are copied from the pod's, as kubelet does.
    """
    config = cri.ContainerConfig()
    if path:
        load_message(path, config)
    if name is not None:
        config.metadata.name = name
    if image is not None:
        config.image.image = image
    if command:
        del config.command[:]
        del config.args[:]
        config.command.extend(command)
    for key, value in (env or {}).items():
        config.envs.append(cri.KeyValue(key=key, value=value))
    if workdir is not None:
        config.working_dir = workdir
    if tty is not None:
        config.tty = tty
    if stdin is not None:
        config.stdin = stdin
    config.labels.update(labels or {})
    if not config.image.image:
        raise ConfigError("the container needs an image (--image, or image.image in the config file)")
    if not config.metadata.name:
        config.metadata.name = Path(config.image.image.split("@")[0].split(":")[0]).name or "container"
    if log_path is not None:
        config.log_path = log_path
    elif not config.log_path:
        config.log_path = f"{config.metadata.name}/{config.metadata.attempt}.log"
    if pod is not None:
        pod_ns = pod.linux.security_context
        if not config.linux.security_context.HasField("namespace_options") and pod_ns.HasField("namespace_options"):
            config.linux.security_context.namespace_options.CopyFrom(pod_ns.namespace_options)
    return config


def pod_config_from_status(status: cri.PodSandboxStatusResponse) -> cri.PodSandboxConfig | None:
    """containerd's verbose PodSandboxStatus carries the pod's whole config in info["info"]["config"]."""
    raw = status.info.get("info")
    if not raw:
        return None
    try:
        data = json.loads(raw).get("config")
    except (ValueError, AttributeError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        return json_format.ParseDict(data, cri.PodSandboxConfig(), ignore_unknown_fields=True)
    except json_format.ParseError:
        return None


def pod_config_from_pod_status(status: cri.PodSandboxStatus) -> cri.PodSandboxConfig:
    """The best PodSandboxConfig PodSandboxStatus allows: identity, labels, annotations, namespace modes,
    and the log directory kubelet (and `runp` by default) gives every pod."""
    meta = status.metadata
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt),
        labels=dict(status.labels), annotations=dict(status.annotations),
        log_directory=f"{LOG_ROOT}/{meta.namespace}_{meta.name}_{meta.uid}")
    config.linux.security_context.namespace_options.CopyFrom(status.linux.namespaces.options)
    return config


# `runp` remembers each pod's exact config here so `create` can pass it back (CRI wants it with every
# CreateContainer, and containerd takes the log directory from it). Root's own directory; best effort.
STATE_ENV = "KUASAR_CTL_STATE"
DEFAULT_STATE_DIR = "/run/kuasar/ctl"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR)


def remember_pod(pod_id: str, config: cri.PodSandboxConfig) -> None:
    try:
        directory = state_dir() / "pods"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(directory / f"{pod_id}.json",
                     json_format.MessageToJson(config, preserving_proto_field_name=True).encode(), mode=0o644,
                     durable=False)
    except OSError:
        pass


def remembered_pod(pod_id: str) -> cri.PodSandboxConfig | None:
    path = state_dir() / "pods" / f"{pod_id}.json"
    try:
        return json_format.Parse(path.read_text(), cri.PodSandboxConfig(), ignore_unknown_fields=True)
    except (OSError, json_format.ParseError):
        return None


def forget_pod(pod_id: str) -> None:
    try:
        (state_dir() / "pods" / f"{pod_id}.json").unlink()
    except OSError:
        pass
