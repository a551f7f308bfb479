"""Face alignment facts shared by the synthetic generator and the evaluator.

ArcFace's 5-point template (eyes, nose tip, mouth corners) in a 112x112 crop, as insightface
aligns every training and test face.
"""

import numpy as np

ALIGNED_SIZE = 112
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
