import subprocess
import sys


def test_core_modules_import_no_service_stack():
    code = (
        "import sys\n"
        "import flowbp_core.schedules, flowbp_core.cache, flowbp_core.sampling, flowbp_core.methods.indices\n"
        "import flowbp_core.quadrature, flowbp_core.methods, flowbp_core.losses\n"
        "bad = [m for m in ('ray', 'fastapi', 'redis') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
