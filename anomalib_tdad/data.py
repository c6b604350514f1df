"""``MVTec``: the MVTec AD datamodule under its anomalib 1.x name.

anomalib 2.x renamed ``MVTec`` to ``MVTecAD``; configs, papers and scripts still say
``--data MVTec``. Registered under the entry-point group ``anomalib.data``, this subclass makes the
old name work with anomalib's CLI unchanged (through the start-up hook; without it, use the dotted
path ``--data anomalib_tdad.data.MVTec``). It behaves exactly like :class:`MVTecAD`.
"""

from anomalib.data import MVTecAD


class MVTec(MVTecAD):
    """MVTec AD datamodule (alias of :class:`anomalib.data.MVTecAD`; same arguments)."""
