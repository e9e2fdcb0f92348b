"""Names shared by storage, the manifest and the checkpoint, in a module that imports nothing.

Reading a manifest or a checkpoint (`trolley-etl status`) needs these but not the code that
writes files, which loads pydicom.
"""

#: The folder layout when a manifest gives none.
DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
#: The default layout of metadata-only pulls stored as DICOM JSON.
JSON_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.json"
#: Folder under the root that trolley-etl owns (temp files, checkpoint, logs, reports).
STATE_DIR = ".trolley"
#: The checkpoint's file name in the state folder.
CHECKPOINT_NAME = "checkpoint.sqlite"
#: The UIDs every stored object is checked and filed by.
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
