#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: the cutover authors
# SPDX-License-Identifier: Apache-2.0

"""Ansible module: one service's release on one host, through the cutover CLI."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: cutover_release
short_description: Release, roll back or remove a service with cutover on one host
version_added: "0.1.0"
description:
  - Drives the C(cutover) command-line client of the host's cutover daemon and reads its
    C(--json) output. The daemon starts the new release without publishing its port,
    waits for its health check and points the host port at it in one nftables
    transaction; a release that is not healthy is refused and the old release keeps
    serving.
  - Idempotent. With I(state=deployed), nothing is done when I(image) is already the
    active release of the service (read from C(cutover status --json)).
  - Check mode changes nothing on the host. It reads the status and, with a I(manifest),
    validates it with C(cutover plan).
  - Exit codes of the CLI map to results. C(0) done; C(1) the release was refused or failed
    safely, reported as a failed task that says the old release still serves; C(2) invalid
    input; C(3) the daemon is unreachable.
options:
  name:
    description: Name of the service (the C(name) of its manifest).
    type: str
    required: true
  state:
    description:
      - C(deployed) makes I(image) the active release (registers the service from
        I(manifest) first when given).
      - C(rolled_back) goes back to release I(to), or to the previous release when I(to)
        is not set.
      - C(absent) removes the service, its rules and its containers.
    type: str
    choices: [deployed, rolled_back, absent]
    default: deployed
  image:
    description: Image of the release. Required with I(state=deployed).
    type: str
  manifest:
    description:
      - The service's manifest. Either a path on the managed host, the manifest's YAML
        text, or a dictionary (for example a file lookup passed through the C(from_yaml) filter).
      - Its C(image) is replaced with I(image). When given, the release goes through
        C(cutover apply), which also registers a service the daemon does not know yet;
        without it the service must exist and the release goes through C(cutover deploy).
    type: raw
  to:
    description: Release number to roll back to (I(state=rolled_back)); default the previous one.
    type: int
  pull:
    description:
      - Pull I(image) with the C(docker) client before releasing it (a registry must be
        reachable from the host). cutover itself never pulls.
    type: bool
    default: false
  socket:
    description: Control socket of the cutover daemon.
    type: path
    default: /run/cutover/cutover.sock
  binary:
    description: The cutover client to run (a name on C(PATH) or a path).
    type: str
    default: cutover
  docker_host:
    description: Engine socket the C(docker) client uses when I(pull=true).
    type: str
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
notes:
  - A manifest change without a new image is not applied by this module (the image
    decides idempotency); run C(cutover apply) for that.
author:
  - cutover maintainers
"""

EXAMPLES = r"""
- name: Release web 2.0 (the service is already registered)
  cutover.fleet.cutover_release:
    name: web
    image: registry.example.com/web:2.0

- name: Register and release from a manifest on the controller
  cutover.fleet.cutover_release:
    name: web
    image: registry.example.com/web:2.0
    manifest: "{{ lookup('ansible.builtin.file', 'files/web.yaml') | from_yaml }}"
    pull: true

- name: Back to release 4
  cutover.fleet.cutover_release:
    name: web
    state: rolled_back
    to: 4

- name: Remove the service
  cutover.fleet.cutover_release:
    name: web
    state: absent
"""

RETURN = r"""
outcome:
  description:
    - What the daemon reported for the operation (C(--json) of deploy, apply or rollback).
      Durations are as the daemon measured them.
  returned: changed and not check mode
  type: dict
  contains:
    service: {description: The service., type: str}
    from: {description: Release that served before (null for the first one)., type: int}
    to: {description: Release that serves now., type: int}
    outcome: {description: What happened (e.g. C(switched))., type: str}
    health_ms: {description: Time until the new release was healthy., type: int}
    switch_us: {description: Duration of the nftables transaction that switched., type: int}
    drain_ms: {description: Time the old release took to drain., type: int}
    start_ms: {description: Time to create and start the container., type: int}
    total_ms: {description: The whole operation., type: int}
  sample: {service: web, from: 3, to: 4, outcome: switched, health_ms: 412, switch_us: 180, drain_ms: 20}
previous:
  description: The service's status before the task (C(cutover status --json)); null if it did not exist.
  returned: always
  type: dict
  sample: {name: web, mode: nat, active: 3, image: "web:1.9", ports: ["8080/tcp -> 80"], kept: [2, 1]}
status:
  description: The service's status after the task; null if it does not exist.
  returned: always
  type: dict
switched:
  description: True when the active release changed on this host (what a fleet revert needs to know).
  returned: always
  type: bool
release_from:
  description: The active release number before the task (null if none).
  returned: always
  type: int
release_to:
  description: The active release number after the task (in check mode, as it would be if known).
  returned: always
  type: int
rc:
  description: Exit code of the last cutover command.
  returned: on failure
  type: int
stderr:
  description: What the last cutover command printed on stderr.
  returned: on failure
  type: str
"""

import json
import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule

EXIT_REFUSED = 1
EXIT_INVALID = 2
EXIT_UNREACHABLE = 3


class Cutover(object):
    """The cutover CLI of one host, with its exit codes turned into module results."""

    def __init__(self, module):
        self.module = module
        binary = module.params["binary"]
        if os.sep not in binary:
            binary = module.get_bin_path(binary, required=True)
        self.binary = binary
        self.socket = module.params["socket"]

    def run(self, args):
        cmd = [self.binary, "--socket", self.socket] + args
        env = {"CUTOVER_LOG": "warn", "NO_COLOR": "1"}
        return self.module.run_command(cmd, environ_update=env)

    def fail(self, what, rc, out, err, **extra):
        name = self.module.params["name"]
        detail = (err or out or "").strip()
        if rc == EXIT_REFUSED:
            served = extra.get("previous") or {}
            still = "release %s (%s)" % (served.get("active"), served.get("image")) if served.get("active") else "the old release"
            msg = "cutover refused %s (service %s) on this host; %s still serves: %s" % (what, name, still, detail)
        elif rc == EXIT_INVALID:
            msg = "cutover rejected the input for %s (service %s): %s" % (what, name, detail)
        elif rc == EXIT_UNREACHABLE:
            msg = "the cutover daemon is unreachable at %s (is it running?): %s" % (self.socket, detail)
        else:
            msg = "cutover: %s (service %s) failed (exit %s): %s" % (what, name, rc, detail)
        self.module.fail_json(msg=msg, rc=rc, stdout=out, stderr=err, refused=(rc == EXIT_REFUSED), **extra)

    def status(self):
        """The service's entry of `cutover status --json`, or None if it does not exist."""
        rc, out, err = self.run(["status", "--json"])
        if rc != 0:
            self.fail("reading the status", rc, out, err)
        try:
            services = json.loads(out)
        except ValueError as e:
            self.module.fail_json(msg="unexpected output of cutover status --json: %s" % e, stdout=out)
        for s in services:
            if s.get("name") == self.module.params["name"]:
                return s
        return None

    def outcome(self, what, args, previous):
        rc, out, err = self.run(args + ["--json"])
        if rc != 0:
            self.fail(what, rc, out, err, previous=previous, status=self.status_or_none())
        try:
            data = json.loads(out)
        except ValueError as e:
            self.module.fail_json(msg="unexpected output of cutover %s --json: %s" % (args[0], e), stdout=out)
        if isinstance(data, list):
            # `apply` answers one outcome per manifest; this module sends one.
            data = data[0] if data else {}
        return data

    def status_or_none(self):
        rc, out, _err = self.run(["status", "--json"])
        if rc != 0:
            return None
        try:
            for s in json.loads(out):
                if s.get("name") == self.module.params["name"]:
                    return s
        except ValueError:
            pass
        return None


def manifest_text(module, manifest, image):
    """The manifest as YAML text with its image set to `image`."""
    if isinstance(manifest, dict):
        data = dict(manifest)
        data["image"] = image
        # JSON is YAML: cutover reads it as a manifest.
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    if not isinstance(manifest, str):
        module.fail_json(msg="manifest: a path, YAML text or a dictionary")
    if "\n" in manifest:
        text = manifest
    else:
        try:
            with open(manifest) as f:
                text = f.read()
        except (IOError, OSError) as e:
            module.fail_json(msg="manifest %s: %s" % (manifest, e))
    # The top-level `image:` line (manifests keep their top-level keys at column 0).
    line = "image: %s" % json.dumps(image)
    if re.search(r"^image:", text, flags=re.M):
        return re.sub(r"^image:.*$", lambda _m: line, text, count=1, flags=re.M)
    return text.rstrip("\n") + "\n" + line + "\n"


def with_manifest_file(module, text, action):
    fd, path = tempfile.mkstemp(prefix="cutover-manifest-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return action(path)
    finally:
        os.unlink(path)


def image_diff(name, before, after):
    return {
        "before_header": "%s (active release)" % name,
        "after_header": "%s (active release)" % name,
        "before": "image: %s\n" % before if before else "",
        "after": "image: %s\n" % after if after else "",
    }


def deployed(module, cutover):
    p = module.params
    name, image = p["name"], p["image"]
    previous = cutover.status()
    before = previous.get("image") if previous else None
    release_from = previous.get("active") if previous else None
    result = dict(changed=False, previous=previous, status=previous, switched=False,
                  release_from=release_from, release_to=release_from)
    if previous and previous.get("active") and before == image:
        module.exit_json(**result)
    if previous is None and p["manifest"] is None:
        module.fail_json(msg="service %s does not exist on this host; give its manifest to register it" % name, **result)
    result["changed"] = True
    result["diff"] = image_diff(name, before, image)
    text = manifest_text(module, p["manifest"], image) if p["manifest"] is not None else None
    if module.check_mode:
        if text is not None:
            rc, out, err = with_manifest_file(module, text, lambda path: cutover.run(["plan", path]))
            if rc != 0:
                cutover.fail("planning the release", rc, out, err, previous=previous)
        result["release_to"] = None
        module.exit_json(**result)
    if p["pull"]:
        docker = module.get_bin_path("docker", required=True)
        env = {"DOCKER_HOST": p["docker_host"]} if p["docker_host"] else {}
        rc, out, err = module.run_command([docker, "pull", image], environ_update=env)
        if rc != 0:
            module.fail_json(msg="pulling %s failed; nothing was released, the old release still serves: %s" % (image, err.strip()),
                             rc=rc, stderr=err, **result)
    what = "the release of %s" % image
    if text is not None:
        outcome = with_manifest_file(module, text, lambda path: cutover.outcome(what, ["apply", path], previous))
    else:
        outcome = cutover.outcome(what, ["deploy", name, "--image", image], previous)
    status = cutover.status()
    result.update(outcome=outcome, status=status, release_to=status.get("active") if status else None)
    result["switched"] = result["release_to"] != release_from
    result["changed"] = result["switched"] or (status or {}).get("image") != before
    module.exit_json(**result)


def rolled_back(module, cutover):
    p = module.params
    name, to = p["name"], p["to"]
    previous = cutover.status()
    if previous is None:
        module.fail_json(msg="service %s does not exist on this host: nothing to roll back" % name)
    release_from = previous.get("active")
    result = dict(changed=False, previous=previous, status=previous, switched=False,
                  release_from=release_from, release_to=release_from)
    if to is not None and release_from == to:
        module.exit_json(**result)
    result["changed"] = True
    result["diff"] = {"before": "release: %s\nimage: %s\n" % (release_from, previous.get("image")),
                      "after": "release: %s\n" % (to if to is not None else "previous")}
    if module.check_mode:
        result["release_to"] = to
        module.exit_json(**result)
    args = ["rollback", name] + (["--to", str(to)] if to is not None else [])
    outcome = cutover.outcome("the rollback", args, previous)
    status = cutover.status()
    result.update(outcome=outcome, status=status, release_to=status.get("active") if status else None)
    result["switched"] = result["release_to"] != release_from
    result["diff"]["after"] = "release: %s\nimage: %s\n" % (result["release_to"], (status or {}).get("image"))
    module.exit_json(**result)


def absent(module, cutover):
    name = module.params["name"]
    previous = cutover.status()
    release_from = previous.get("active") if previous else None
    result = dict(changed=previous is not None, previous=previous, status=None, switched=False,
                  release_from=release_from, release_to=None)
    if previous is None:
        result["status"] = None
        module.exit_json(**result)
    result["diff"] = image_diff(name, previous.get("image"), None)
    if module.check_mode:
        result["status"] = previous
        module.exit_json(**result)
    rc, out, err = cutover.run(["remove", name, "--json"])
    if rc != 0:
        cutover.fail("the removal", rc, out, err, previous=previous)
    result["switched"] = release_from is not None
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="deployed", choices=["deployed", "rolled_back", "absent"]),
            image=dict(type="str"),
            manifest=dict(type="raw"),
            to=dict(type="int"),
            pull=dict(type="bool", default=False),
            socket=dict(type="path", default="/run/cutover/cutover.sock"),
            binary=dict(type="str", default="cutover"),
            docker_host=dict(type="str"),
        ),
        required_if=[("state", "deployed", ["image"])],
        supports_check_mode=True,
    )
    cutover = Cutover(module)
    state = module.params["state"]
    if state == "deployed":
        deployed(module, cutover)
    elif state == "rolled_back":
        rolled_back(module, cutover)
    else:
        absent(module, cutover)


if __name__ == "__main__":
    main()
