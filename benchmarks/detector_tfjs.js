// Runs the TF.js CenterNet graph with TensorFlow.js itself (cpu backend) on raw inputs, for
// benchmarks/detector_runtime_check.py, which writes the inputs and compares the outputs with detector.py's.
//   node benchmarks/detector_tfjs.js MODEL_DIR IN.f32 [IN.f32 ...]
// Each IN.f32 holds 1 x 512 x 512 x 3 float32 (little-endian, RGB 0..255); beside it go IN.<output>.f32 files
// (keypoints, wh, detections: float32, the graph's NHWC shapes). Needs @tensorflow/tfjs-core, -converter and
// -backend-cpu (4.22.0, as @vladmandic/human 3.3.6 is built on) on NODE_PATH.
'use strict';
const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs-core');
require('@tensorflow/tfjs-backend-cpu');
const converter = require('@tensorflow/tfjs-converter');

async function main() {
  const [dir, ...inputs] = process.argv.slice(2);
  const model = JSON.parse(fs.readFileSync(path.join(dir, 'centernet.json'), 'utf8'));
  const manifest = model.weightsManifest[0];
  const bin = fs.readFileSync(path.join(dir, manifest.paths[0]));
  const weightData = bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength);
  await tf.setBackend('cpu');
  const graph = await converter.loadGraphModel(tf.io.fromMemory({
    modelTopology: model.modelTopology, weightSpecs: manifest.weights, weightData,
  }));
  const names = ['tower_0/keypoints', 'tower_0/wh', 'tower_0/detections'];
  for (const file of inputs) {
    const raw = fs.readFileSync(file);
    const x = tf.tensor(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), [1, 512, 512, 3]);
    const start = Date.now();
    const outs = graph.execute(x, names);
    const values = await Promise.all(outs.map((t) => t.data()));
    const ms = Date.now() - start;
    names.forEach((name, i) => {
      const stem = file.replace(/\.f32$/, '');
      fs.writeFileSync(`${stem}.${name.split('/')[1]}.f32`, Buffer.from(values[i].buffer));
    });
    console.log(`${ms} ms (tfjs ${tf.version_core}, backend ${tf.getBackend()})`);
    tf.dispose([x, ...outs]);
  }
}

main().catch((err) => { console.error(`error: ${err.message}`); process.exit(1); });
