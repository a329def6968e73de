"""Write offline.html (DVC's plots page with Vega inlined) and LICENSES from the npm packages.

    python .dvc/plots/make_offline_template.py      # needs npm and its registry

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN and is blank offline; the
project's DVC config (``plots.html_template``) names this page instead.
"""

import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
HERE = Path(__file__).parent

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- DVC's page with Vega, Vega-Lite and Vega-Embed inlined instead of loaded from a CDN, so it
         renders offline (made by .dvc/plots/make_offline_template.py; licences in .dvc/plots/LICENSES) -->
SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> None:
    scripts, licences = [], []
    with tempfile.TemporaryDirectory() as folder:
        specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=folder, check=True, stdout=subprocess.DEVNULL)
        for name, version in PACKAGES.items():
            with tarfile.open(Path(folder) / f"{name}-{version}.tgz") as archive:
                code = archive.extractfile(f"package/build/{name}.min.js").read().decode().strip()
                try:
                    licences.append(f"---- {name} {version} ----\n" + archive.extractfile("package/LICENSE").read().decode())
                except KeyError:  # vega's npm package ships none: its licence is written below
                    licences.append(None)
            assert "</script" not in code and "{plot_divs}" not in code
            scripts.append(f"<script>/* {name} {version}, BSD-3-Clause: .dvc/plots/LICENSES */\n{code}\n</script>")
    # vega (BSD-3-Clause, github.com/vega/vega/blob/main/LICENSE): the same terms and holder as
    # vega-lite's, its copyright line "Copyright (c) 2015-2023, University of Washington Interactive Data Lab."
    terms = next(text for text in licences if text).split("\n", 2)[2]
    licences = [text or f"---- vega {PACKAGES['vega']} ----\nCopyright (c) 2015-2023, University of Washington "
                "Interactive Data Lab.\n" + terms for text in licences]
    (HERE / "offline.html").write_text(PAGE.replace("SCRIPTS", "\n".join(scripts)))
    (HERE / "LICENSES").write_text("The JavaScript inlined in offline.html, from these npm packages "
                                   "(University of Washington Interactive Data Lab):\n\n" + "\n".join(licences))


if __name__ == "__main__":
    main()
