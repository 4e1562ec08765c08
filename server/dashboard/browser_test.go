package dashboard_test

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

var updateScreenshot = flag.Bool("update-screenshot", false, "also write the dashboard screenshot to docs/dashboard.png")

const (
	chromiumPath      = "/usr/bin/chromium"
	requireBrowserEnv = "QBRIDGE_REQUIRE_BROWSER"
	artifactsEnv      = "QBRIDGE_ARTIFACTS"
)

// browser starts a headless Chromium with a fresh profile and returns its
// tab's context, and a list of the uncaught exceptions of its pages.
func browser(t *testing.T) (context.Context, func() []string) {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		if os.Getenv(requireBrowserEnv) == "1" {
			t.Fatalf("%s: %v (%s=1 requires the browser test)", chromiumPath, err, requireBrowserEnv)
		}
		t.Skipf("no browser at %s (%v); set %s=1 to make this a failure", chromiumPath, err, requireBrowserEnv)
	}
	profile := t.TempDir() // removed after the browser has stopped (cleanups run last-in first-out)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chromiumPath),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("no-default-browser-check", true),
		chromedp.Flag("disable-breakpad", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("hide-scrollbars", true),
		chromedp.Flag("mute-audio", true),
		chromedp.UserDataDir(profile),
		chromedp.WindowSize(1280, 900),
	)
	ctx, cancelCtx := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		cancelCtx()
		cancelAlloc() // waits for the browser process to exit
	})
	start, cancelStart := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelStart()
	go func() {
		select {
		case <-start.Done():
			if start.Err() == context.DeadlineExceeded {
				cancelCtx() // the browser did not come up: give up on it
			}
		case <-ctx.Done():
		}
	}()
	if err := chromedp.Do(ctx); err != nil { // starts the browser (no timeout on this context: it lives as long as the browser)
		t.Fatalf("start %s: %v", chromiumPath, err)
	}
	cancelStart()

	var mu sync.Mutex
	var exceptions []string
	if err := chromedp.Listen(ctx, func(ev any) {
		if ev, ok := ev.(*runtime.EventExceptionThrown); ok {
			d := ev.ExceptionDetails
			text := d.Text
			if d.Exception != nil && d.Exception.Description != "" {
				text += " " + d.Exception.Description
			}
			mu.Lock()
			exceptions = append(exceptions, fmt.Sprintf("%s:%d: %s", d.URL, d.LineNumber+1, text))
			mu.Unlock()
		}
	}); err != nil {
		t.Fatal(err)
	}
	return ctx, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), exceptions...)
	}
}

// do runs browser actions with a deadline.
func do(t *testing.T, ctx context.Context, within time.Duration, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	if err := chromedp.Do(c, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// eval evaluates a JavaScript expression in the page.
func eval[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(c, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// waitFor polls a JavaScript predicate in the page until it is true.
func waitFor(t *testing.T, ctx context.Context, within time.Duration, what, expr string) {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, within+2*time.Second)
	defer cancel()
	_, err := chromedp.Run(c, chromedp.Poll[bool](expr, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(within)))
	if err != nil {
		page := ""
		if s, e := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById('status').textContent + ' | ' + document.getElementById('error-text').textContent`)); e == nil {
			page = s
		}
		t.Fatalf("waiting %v for %s: %v (status | error on the page: %s)", within, what, err, page)
	}
}

// cell is the JavaScript of a queue table cell's raw value.
func cell(queue, field string) string {
	return fmt.Sprintf(`(document.querySelector('#queue-rows tr[data-queue=%q] td[data-field=%q]') || {dataset: {}}).dataset.value`, queue, field)
}

// TestBrowser drives the dashboard in headless Chromium: sign-in, live
// depth while a workload enqueues and a consumer drains, the chart, a dead
// letter replayed through the confirmation dialog, the phone layout, and
// the screenshot.
func TestBrowser(t *testing.T) {
	began := time.Now()
	ctx, exceptions := browser(t)
	e := startEnv(t, envConfig{auth: true, interval: 200 * time.Millisecond, samples: 300})
	e.enqueueN("orders", 5)
	deadID := e.killMessage("billing", []byte(`{"invoice": 7, "amount": "12.50"}`), "cannot parse amount")

	// Sign in: the dashboard requires a token and asks for it.
	do(t, ctx, 15*time.Second, "load the dashboard", chromedp.Navigate(e.url+"/#/queues"))
	waitFor(t, ctx, 10*time.Second, "the token dialog", `document.getElementById('token-dialog').open`)
	do(t, ctx, 5*time.Second, "enter the token",
		chromedp.SendKeys(chromedp.ID("token-input"), adminToken),
		chromedp.Click(chromedp.ID("token-save")))
	waitFor(t, ctx, 10*time.Second, "orders listed with 5 ready", cell("orders", "ready")+` === '5'`)
	if got := eval[string](t, ctx, cell("billing", "dead")); got != "1" {
		t.Fatalf("billing dead %q in the table, want 1", got)
	}

	// A workload enqueues: the displayed depth grows, and keeps changing.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(50 * time.Millisecond) // the workload's pace, not a synchronisation
		defer tick.Stop()
		for range 400 {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			msgs := make([]*qbridgev1.BatchMessage, 10)
			for i := range msgs {
				msgs[i] = &qbridgev1.BatchMessage{Payload: []byte("work")}
			}
			c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := e.queues.EnqueueBatch(c, &qbridgev1.EnqueueBatchRequest{Queue: "orders", Messages: msgs})
			cancel()
			if err != nil {
				t.Errorf("workload: %v", err)
				return
			}
		}
	}()
	stopWorkload := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopWorkload)
	waitFor(t, ctx, 10*time.Second, "the ready depth to grow", `+`+cell("orders", "ready")+` > 5`)
	first := eval[string](t, ctx, cell("orders", "ready"))
	waitFor(t, ctx, 10*time.Second, "the ready depth to change again", `+`+cell("orders", "ready")+` > `+first)
	stopWorkload()

	// A consumer drains the queue, acking what it takes: the depth falls
	// to 0.
	cctx, stopConsumer := context.WithCancel(context.Background())
	defer stopConsumer()
	st, err := e.queues.Consume(cctx, &qbridgev1.ConsumeRequest{Queue: "orders", MaxInFlight: 64})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			resp, err := st.Recv()
			if err != nil {
				return
			}
			tokens := make([]string, len(resp.GetDeliveries()))
			for i, d := range resp.GetDeliveries() {
				tokens[i] = d.GetAckToken()
			}
			if _, err := e.queues.Ack(cctx, &qbridgev1.AckRequest{AckTokens: tokens}); err != nil {
				return
			}
		}
	}()
	waitFor(t, ctx, 15*time.Second, "orders to drain to 0 on the page", cell("orders", "ready")+` === '0'`)
	if r := e.stats("orders").GetReady(); r != 0 {
		t.Fatalf("orders ready %d after the drain", r)
	}
	stopConsumer()

	// The queue page draws its charts.
	do(t, ctx, 5*time.Second, "open orders", chromedp.Click(chromedp.CSS(`#queue-rows tr[data-queue="orders"] a`)))
	waitFor(t, ctx, 10*time.Second, "the orders page", `!document.getElementById('view-queue').hidden && document.getElementById('detail-name').textContent === 'orders' && document.getElementById('stat-ready').dataset.value === '0'`)
	waitFor(t, ctx, 10*time.Second, "chart points", `+document.getElementById('chart-depth').dataset.points > 10 && +document.getElementById('chart-throughput').dataset.points > 10`)
	// Pixels of the ready line (#2563eb) and of the enqueue line (#0891b2).
	const colored = `((id, r, g, b) => {
		const c = document.getElementById(id);
		const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
		let n = 0;
		for (let i = 0; i < px.length; i += 4) {
			if (px[i+3] > 200 && Math.abs(px[i]-r) < 40 && Math.abs(px[i+1]-g) < 40 && Math.abs(px[i+2]-b) < 40) n++;
		}
		return n;
	})`
	if n := eval[int](t, ctx, colored+`('chart-depth', 0x25, 0x63, 0xeb)`); n < 50 {
		t.Fatalf("the depth chart has %d pixels of the ready line", n)
	}
	if n := eval[int](t, ctx, colored+`('chart-throughput', 0x08, 0x91, 0xb2)`); n < 50 {
		t.Fatalf("the throughput chart has %d pixels of the enqueue line", n)
	}
	screenshot(t, ctx, "dashboard.png", *updateScreenshot)

	// Replay the dead letter of billing through the UI.
	do(t, ctx, 5*time.Second, "open billing", chromedp.Click(chromedp.CSS(`#queue-rows tr[data-queue="billing"] a`)))
	waitFor(t, ctx, 10*time.Second, "billing's stats", `document.getElementById('detail-name').textContent === 'billing' && document.getElementById('stat-dead').dataset.value === '1'`)
	do(t, ctx, 5*time.Second, "open the dead letters", chromedp.Click(chromedp.ID("tab-dead")))
	row := fmt.Sprintf(`#message-list li[data-id=%q]`, deadID)
	waitFor(t, ctx, 10*time.Second, "the dead letter listed", fmt.Sprintf(`!!document.querySelector(%q)`, row))
	if got := eval[string](t, ctx, fmt.Sprintf(`document.querySelector(%q).textContent`, row)); !bytes.Contains([]byte(got), []byte("cannot parse amount")) {
		t.Fatalf("the dead letter shows %q", got)
	}
	do(t, ctx, 5*time.Second, "click replay", chromedp.Click(chromedp.CSS(row+` button[data-action="replay"]`)))
	waitFor(t, ctx, 10*time.Second, "the confirmation dialog", `document.getElementById('confirm-dialog').open`)
	if got := eval[string](t, ctx, `document.getElementById('confirm-message').textContent`); !bytes.Contains([]byte(got), []byte(deadID)) {
		t.Fatalf("the confirmation says %q", got)
	}
	if st := e.stats("billing"); st.GetDead() != 1 { // nothing happens before the confirmation
		t.Fatalf("billing dead %d before the confirmation", st.GetDead())
	}
	do(t, ctx, 5*time.Second, "confirm", chromedp.Click(chromedp.ID("confirm-ok")))
	waitFor(t, ctx, 10*time.Second, "dead 0 and ready 1 on the page",
		`document.getElementById('stat-dead').dataset.value === '0' && document.getElementById('stat-ready').dataset.value === '1' && `+
			cell("billing", "dead")+` === '0' && `+cell("billing", "ready")+` === '1'`)
	if st := e.stats("billing"); st.GetDead() != 0 || st.GetReady() != 1 {
		t.Fatalf("billing after the replay: dead %d ready %d", st.GetDead(), st.GetReady())
	}
	if got := eval[string](t, ctx, `document.getElementById('notice').textContent`); got != "Replayed 1 dead letter of billing." {
		t.Fatalf("notice %q", got)
	}

	// The pub/sub view tails a channel.
	do(t, ctx, 5*time.Second, "tail a channel",
		chromedp.Click(chromedp.ID("nav-pubsub")),
		chromedp.SendKeys(chromedp.ID("tail-channel"), "news.sports"),
		chromedp.Click(chromedp.ID("tail-start")))
	waitFor(t, ctx, 10*time.Second, "the subscription", `document.getElementById('tail-status').dataset.subscribed === '1'`)
	if _, err := e.queues.Publish(ctxT(t, 5*time.Second), &qbridgev1.PublishRequest{Channel: "news.sports", Payload: []byte("goal!")}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 10*time.Second, "the published message", `(document.querySelector('#tail-log li[data-channel="news.sports"] pre') || {}).textContent === 'goal!'`)

	// A phone: the list fits the width (rows become cards).
	do(t, ctx, 10*time.Second, "phone viewport",
		chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile, chromedp.EmulateTouch, chromedp.EmulateScale(2)),
		chromedp.Navigate(e.url+"/#/queues"))
	waitFor(t, ctx, 10*time.Second, "the list on a phone", cell("orders", "ready")+` === '0' && `+cell("billing", "ready")+` === '1'`)
	if w := eval[int](t, ctx, `window.innerWidth`); w != 390 {
		t.Fatalf("viewport width %d, want 390", w)
	}
	if ov := eval[string](t, ctx, `(() => {
		const d = document.documentElement, wrap = document.getElementById('queue-table-wrap'), table = document.getElementById('queue-table');
		if (d.scrollWidth > window.innerWidth) return 'page ' + d.scrollWidth + ' > ' + window.innerWidth;
		if (table.scrollWidth > wrap.clientWidth) return 'table ' + table.scrollWidth + ' > ' + wrap.clientWidth;
		for (const el of document.querySelectorAll('#queue-rows td, header *')) {
			const r = el.getBoundingClientRect();
			if (r.right > window.innerWidth + 0.5) return el.tagName + '.' + el.className + ' ends at ' + r.right;
		}
		return '';
	})()`); ov != "" {
		t.Fatalf("horizontal overflow on a phone: %s", ov)
	}
	screenshot(t, ctx, "dashboard-phone.png", false)

	// API errors show: a producer token may not list queues.
	do(t, ctx, 10*time.Second, "sign in as a producer",
		chromedp.Evaluate[chromedp.Void](`sessionStorage.setItem('qbridge.token', `+strconv.Quote(producerToken)+`)`),
		chromedp.Reload())
	waitFor(t, ctx, 10*time.Second, "the 403 in the error banner",
		`!document.getElementById('error-banner').hidden && document.getElementById('error-text').textContent.startsWith('HTTP 403: principal "orders-api" may not call')`)

	if ex := exceptions(); len(ex) > 0 {
		t.Fatalf("uncaught exceptions in the page: %q", ex)
	}
	t.Logf("browser test took %v", time.Since(began).Round(time.Millisecond))
}

// screenshot writes a full-page PNG to $QBRIDGE_ARTIFACTS (or a temporary
// directory), and to docs/ of the repository when toDocs.
func screenshot(t *testing.T, ctx context.Context, name string, toDocs bool) {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := chromedp.Do(c, chromedp.Evaluate[chromedp.Void](`window.scrollTo(0, 0)`)); err != nil {
		t.Fatal(err)
	}
	png, err := chromedp.Run(c, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Fatalf("the screenshot is not a PNG")
	}
	dir := os.Getenv(artifactsEnv)
	if dir == "" {
		dir = t.TempDir()
	}
	paths := []string{filepath.Join(dir, name)}
	if toDocs {
		paths = append(paths, filepath.Join(repoRoot(t), "docs", name))
	}
	for _, p := range paths {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s (%d bytes)", p, len(png))
	}
}

// repoRoot is the directory of go.mod above the test's directory.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test directory")
		}
		dir = parent
	}
}
