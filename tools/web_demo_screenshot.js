// The screenshot in README.md (docs/web_demo.png): the web demo (demo/app.py) in headless
// Chromium, driven by Playwright. Not part of the Python stack or CI; needs Node.js, Debian's
// chromium package and `npm install playwright-core` (in any folder on NODE_PATH).
//
//   .venv/bin/python demo/app.py --config-file configs/synthetic/vipa_tiny_cpu.yaml \
//       MODEL.WEIGHTS output/vipa_tiny_cpu/model_final.pth &
//   node tools/web_demo_screenshot.js datasets/refsynth/images/000042.jpg \
//       "the blue object to the right of the hexagon|the black heart|the hexagon" docs/web_demo.png
//   # 256 colours: a third of the size
//   .venv/bin/python -c "from PIL import Image; p = 'docs/web_demo.png'; \
//       Image.open(p).convert('RGB').quantize(256, method=Image.Quantize.MEDIANCUT).save(p, optimize=True)"
//
// Arguments: image, expressions separated by "|", output PNG; URL and browser below.
const { chromium } = require('playwright-core');

const URL = 'http://127.0.0.1:7860';
const BROWSER = '/usr/bin/chromium';
// The page's width; the screenshot takes its whole height.
const VIEWPORT = { width: 1400, height: 1000 };
const PREDICTION_TIMEOUT_MS = 120000;

(async () => {
  const [image, expressions, output] = process.argv.slice(2);
  if (!output) {
    console.error('usage: node tools/web_demo_screenshot.js IMAGE "EXPR|EXPR..." OUTPUT.png');
    process.exit(2);
  }
  const browser = await chromium.launch({ executablePath: BROWSER, args: ['--no-sandbox'] });
  const page = await browser.newPage({ viewport: VIEWPORT });
  await page.goto(URL, { waitUntil: 'networkidle' });
  await page.locator('input[type=file]').first().setInputFiles(image);
  await page.waitForTimeout(1500); // the upload's preview
  await page.locator('textarea').first().fill(expressions.split('|').join('\n'));
  await page.getByRole('button', { name: 'Segment' }).click();
  // The word table fills when the prediction is back; then the galleries finish drawing.
  await page.waitForFunction(() => document.querySelectorAll('table tbody tr').length > 3, null,
                             { timeout: PREDICTION_TIMEOUT_MS });
  await page.waitForTimeout(3000);
  await page.screenshot({ path: output, fullPage: true });
  await browser.close();
})();
