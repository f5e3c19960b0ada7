"""Unit tests of cutover_release's pure parts.

Run with the Python that ansible-core is installed for:
    /usr/bin/python3 -m unittest discover -s dist/ansible/tests/unit
"""

import importlib.util
import json
import os
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "..", "..", "plugins", "modules", "cutover_release.py")

spec = importlib.util.spec_from_file_location("cutover_release", MODULE)
cutover_release = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cutover_release)


class FailJson(Exception):
    pass


class FakeModule(object):
    def fail_json(self, **kwargs):
        raise FailJson(kwargs["msg"])


MANIFEST = "name: web\nimage: web:1\nports:\n  - host: 8080\n    container: 80\nenv:\n  image: not-this-one\n"


class ManifestText(unittest.TestCase):
    def test_text_gets_the_image_at_top_level_only(self):
        text = cutover_release.manifest_text(FakeModule(), MANIFEST, "web:2")
        self.assertIn('image: "web:2"\n', text)
        self.assertIn("  image: not-this-one\n", text)
        self.assertNotIn("web:1", text)

    def test_text_without_image_gets_one(self):
        text = cutover_release.manifest_text(FakeModule(), "name: web\nports: []\n", "web:2")
        self.assertTrue(text.endswith('image: "web:2"\n'))

    def test_dict_becomes_json_with_the_image(self):
        text = cutover_release.manifest_text(FakeModule(), {"name": "web", "image": "web:1"}, "web:2")
        self.assertEqual(json.loads(text), {"name": "web", "image": "web:2"})

    def test_path_is_read(self):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(MANIFEST)
        try:
            text = cutover_release.manifest_text(FakeModule(), f.name, "web:3")
            self.assertIn('image: "web:3"\n', text)
        finally:
            os.unlink(f.name)

    def test_missing_path_fails(self):
        with self.assertRaises(FailJson):
            cutover_release.manifest_text(FakeModule(), "/nonexistent/web.yaml", "web:2")


class Diff(unittest.TestCase):
    def test_image_diff(self):
        d = cutover_release.image_diff("web", "web:1", "web:2")
        self.assertEqual((d["before"], d["after"]), ("image: web:1\n", "image: web:2\n"))


if __name__ == "__main__":
    unittest.main()
