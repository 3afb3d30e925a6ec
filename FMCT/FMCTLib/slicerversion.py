"""Which Slicer FMCT runs on, checked before anything that needs it is imported.

FMCT needs Slicer 5.10 or newer: its Python 3.12 (the engine and the modules use Python 3.10+
syntax and typing, and are tested on 3.12 and later). Slicer 5.8 and older ship Python 3.9,
where importing the module would fail with a TypeError deep in an annotation; instead the
module loads, and its panel shows the message made here.

This file is imported by FMCT.py and FMCTTraining.py before anything else of FMCT, so it is
written for any Python 3 (no f-strings, no annotations): an old Slicer must get this far.
"""

MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 12)


def unsupportedMessage(pythonVersion, slicerVersion=None):
    """None when this Slicer can run FMCT, else one message saying what to do.

    pythonVersion: sys.version_info (or a tuple); slicerVersion: (major, minor) of
    slicer.app, or None outside the application.
    """
    python = tuple(pythonVersion)[:2]
    slicer = tuple(slicerVersion)[:2] if slicerVersion else None
    if python >= MINIMUM_PYTHON and (slicer is None or slicer >= MINIMUM_SLICER):
        return None
    found = "Slicer {0}".format(".".join(str(v) for v in slicer)) if slicer else "this Slicer"
    return ("FMCT needs 3D Slicer {slicer} or newer (Python {python}); {found} has Python {have}. "
            "Download a current Slicer from https://download.slicer.org and install FMCT there.").format(
                slicer=".".join(str(v) for v in MINIMUM_SLICER), python=".".join(str(v) for v in MINIMUM_PYTHON),
                found=found, have=".".join(str(v) for v in python))


def applicationVersion():
    """(major, minor) of the running Slicer application, or None outside it (scripts, tests)."""
    try:
        import slicer

        return (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    except (ImportError, AttributeError):
        return None


try:  # Slicer's translation functions, re-exported so both modules share the one fallback
    from slicer.i18n import tr, translate  # noqa: F401
except ImportError:  # a Slicer older than 5.4 (which then only shows the unsupported message), or no Slicer
    def tr(text):
        return text

    def translate(context, text):
        return text


def showUnsupported(layout, message):
    """Fill a module panel with the one message an unsupported Slicer gets, instead of its UI."""
    import qt

    label = qt.QLabel(message)
    label.wordWrap = True
    layout.addWidget(label)
    layout.addStretch(1)
