"""Subjects without a hand-made mask: faces, persons, the salient region, a focal point or a box.

`--subject` (a `CropRequest.subject`) names where the subject of the subject-aware task comes from:

  auto              faces when any are found, else persons, else the salient region
  face | person     the detected faces (all of them) / persons
  saliency          the salient region (weight-free: contrast with the image border + a centre prior)
  X,Y               a focal point, in pixels of the upright image: a square of side
                    FOCAL_FRACTION (10 %) of the image's shorter side centred on it
  X1,Y1,X2,Y2       a box, in pixels
  PATH              a mask image (white = subject) of the image's size, as `--mask`

`resolve_subject(spec, image)` turns a spec into a `Subject`: a boolean mask of the image's size,
its box, which source was used (`kind`), the faces found and notes saying what happened.
Detection runs on a copy whose longest side is DETECT_SIDE (512) px.

Detectors sit behind two tiny protocols (`FaceDetector`, `PersonDetector`). The real ones come
from MediaPipe's legacy solutions, whose weights ship inside its wheel (the `subject` extra):
BlazeFace full range + short range for faces, the BlazePose detector gating the selfie
segmentation for persons. Without MediaPipe, faces come from OpenCV's Haar cascade where an
OpenCV build ships its XML (4.x wheels do, 5.x do not), else from nothing: `auto` then uses the
salient region and says so; an explicit `face` / `person` is refused with the install command.

Keeping faces whole (`keep_faces_whole`): a crop that cuts through a face (overlaps it without
containing it) is either grown, at its ratio, to contain the face, or shrunk to leave it out,
whichever is closer (IoU) to the crop as proposed; a repair never gives up the subject box. When
no repair exists the crop is grown around the best-ranked face (faces.py: size, confidence, focus,
frontal-ness), and `face_cut_note` says so. A face
is kept with a margin (FACE_MARGIN: 10 % of its size left, right and below, 25 % above for the
forehead and hair the detector leaves out) where the crop's ratio leaves room for it, else as
detected.

The package: `detectors.py` (the detectors, face and person detection, the salient region),
`face_features.py` (what the ranking reads in a detected face: size, focus, frontal-ness,
keypoints, a person around it), `resolve.py` (`Subject`, `resolve_subject`), `outlines.py`
(masks of boxes, mask polygons), `faces.py` (`Face`, main faces, keeping faces whole, the face
notes), `jobs.py` (a loop Job's subject box, faces and result keys). Every name is re-exported
here.
"""

from cropper_engine.engine.subject.detectors import (
    DETECT_SIDE,
    FACE_MARGIN,
    FACE_MIN_FRACTION,
    FACE_MIN_SCORE,
    INSTALL_HINT,
    PERSON_MIN_SCORE,
    SALIENCY_SIDE,
    Face,
    FaceDetector,
    HaarFaces,
    MediaPipeFaces,
    MediaPipePersons,
    PersonDetector,
    detect_faces,
    detect_persons,
    detectors_available,
    face_detector,
    person_detector,
    require_detectors,
    reset_detectors,
    salient_mask,
    set_detectors,
)
from cropper_engine.engine.subject.detectors import (
    _grow_face as _grow_face,  # tests build Faces with it
)
from cropper_engine.engine.subject.faces import (
    CUT_PAD,
    MAIN_FACE_SHARE,
    MAIN_PERSON_SHARE,
    MAX_FACES,
    KeptFace,
    cuts,
    face_cut_note,
    faces_left_out_note,
    faces_to_keep,
    fits,
    keep_faces_whole,
    main_face_indices,
)
from cropper_engine.engine.subject.jobs import attach_subject, job_subject_box, result_extra
from cropper_engine.engine.subject.resolve import FOCAL_FRACTION, Subject, resolve_subject
from cropper_engine.types import FORMS, SubjectSpec, parse_subject

__all__ = [
    "CUT_PAD",
    "DETECT_SIDE",
    "FACE_MARGIN",
    "FACE_MIN_FRACTION",
    "FACE_MIN_SCORE",
    "FOCAL_FRACTION",
    "FORMS",
    "INSTALL_HINT",
    "MAIN_FACE_SHARE",
    "MAIN_PERSON_SHARE",
    "MAX_FACES",
    "PERSON_MIN_SCORE",
    "SALIENCY_SIDE",
    "Face",
    "FaceDetector",
    "HaarFaces",
    "KeptFace",
    "MediaPipeFaces",
    "MediaPipePersons",
    "PersonDetector",
    "Subject",
    "SubjectSpec",
    "attach_subject",
    "cuts",
    "detect_faces",
    "detect_persons",
    "detectors_available",
    "face_cut_note",
    "face_detector",
    "faces_left_out_note",
    "faces_to_keep",
    "fits",
    "job_subject_box",
    "keep_faces_whole",
    "main_face_indices",
    "parse_subject",
    "person_detector",
    "require_detectors",
    "reset_detectors",
    "resolve_subject",
    "result_extra",
    "salient_mask",
    "set_detectors",
]
