#!/usr/bin/python3
"""FACE: face detection over HTTP, the cloudletfs application guest's service.

POST an image (JPEG, PNG, any format OpenCV decodes) to /detect; the answer is
JSON: {"count": N, "faces": [[x, y, w, h], ...], "width": W, "height": H,
"ms": detection time}. GET / answers {"ready": true} once the detector is
loaded. It runs OpenCV's Haar-cascade frontal-face detector from Debian's
opencv-data.
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import cv2
import numpy as np

CASCADE = "/usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml"
PORT = 8080

detector = cv2.CascadeClassifier(CASCADE)
if detector.empty():
    sys.exit("face: cannot load the cascade %s: is opencv-data installed?" % CASCADE)


def detect(body):
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    t = time.monotonic()
    found = detector.detectMultiScale(cv2.equalizeHist(img), scaleFactor=1.1, minNeighbors=5, minSize=(30, 30))
    faces = [[int(v) for v in f] for f in found]
    return {"count": len(faces), "faces": faces, "width": img.shape[1], "height": img.shape[0],
            "ms": round((time.monotonic() - t) * 1000)}


class Handler(BaseHTTPRequestHandler):
    def answer(self, code, doc):
        body = (json.dumps(doc) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(200, {"ready": True})

    def do_POST(self):
        if self.path != "/detect":
            self.answer(404, {"error": "POST an image to /detect"})
            return
        n = int(self.headers.get("Content-Length") or 0)
        if n <= 0:
            self.answer(400, {"error": "empty body: POST the image's bytes"})
            return
        doc = detect(self.rfile.read(n))
        if doc is None:
            self.answer(400, {"error": "the body is not an image OpenCV can decode"})
            return
        self.answer(200, doc)

    def log_message(self, fmt, *args):
        pass


HTTPServer(("", PORT), Handler).serve_forever()
