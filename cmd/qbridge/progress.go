package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"
)

// progressInterval is how often the progress bar is redrawn.
const progressInterval = 200 * time.Millisecond

// progress draws a one-line progress bar with the rate on a terminal,
// redrawn in place with "\r" and "erase to end of line".
type progress struct {
	w     io.Writer
	label string
	total int64 // input bytes, or -1 when unknown (a pipe)
	width int
	// sameTerminal: the other output goes to the terminal of the bar.
	sameTerminal bool

	mu      sync.Mutex
	begin   time.Time
	msgs    int64
	read    int64 // input bytes behind msgs
	samples []progressSample
	drawn   bool // the bar is on the screen

	quit chan struct{}
	done chan struct{}
}

type progressSample struct {
	at   time.Time
	msgs int64
}

func newProgress(w io.Writer, label string, total int64, width int, sameTerminal bool) *progress {
	return &progress{w: w, label: label, total: total, width: width, sameTerminal: sameTerminal, quit: make(chan struct{}), done: make(chan struct{})}
}

// start draws the bar and keeps redrawing it until stop.
func (p *progress) start() {
	p.mu.Lock()
	p.begin = time.Now()
	p.samples = []progressSample{{at: p.begin}}
	p.drawLocked(p.begin, false)
	p.mu.Unlock()
	go func() {
		defer close(p.done)
		t := time.NewTicker(progressInterval)
		defer t.Stop()
		for {
			select {
			case <-p.quit:
				return
			case now := <-t.C:
				p.mu.Lock()
				p.drawLocked(now, false)
				p.mu.Unlock()
			}
		}
	}()
}

// stop draws the final state and ends the line.
func (p *progress) stop() {
	close(p.quit)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	p.drawLocked(time.Now(), true)
	fmt.Fprint(p.w, "\n")
}

// add counts n more messages enqueued, which took read bytes of input.
func (p *progress) add(n, read int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.msgs += n
	p.read += read
}

// around runs f, which writes other output, without the bar getting in
// its way: when that output goes to the same terminal (sameTerminal), the
// bar is erased first and drawn again below it.
func (p *progress) around(f func() error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.sameTerminal {
		return f()
	}
	if p.drawn {
		fmt.Fprint(p.w, "\r\x1b[K")
		p.drawn = false
	}
	err := f()
	p.drawLocked(time.Now(), false)
	return err
}

func (p *progress) drawLocked(now time.Time, final bool) {
	p.samples = append(p.samples, progressSample{at: now, msgs: p.msgs})
	// Keep about the last 3 seconds for the rate.
	for len(p.samples) > 2 && now.Sub(p.samples[1].at) >= 3*time.Second {
		p.samples = p.samples[1:]
	}
	elapsed := now.Sub(p.begin)
	r := 0.0
	if first := p.samples[0]; now.Sub(first.at) >= 500*time.Millisecond && !final {
		r = float64(p.msgs-first.msgs) / now.Sub(first.at).Seconds()
	} else if elapsed > 0 {
		r = float64(p.msgs) / elapsed.Seconds()
	}
	line := renderProgress(progressState{
		label: p.label, msgs: p.msgs, read: p.read, total: p.total,
		rate: r, elapsed: elapsed, final: final,
	}, p.width)
	fmt.Fprint(p.w, "\r"+line+"\x1b[K")
	p.drawn = true
}

// progressState is what one drawing of the bar shows.
type progressState struct {
	label   string
	msgs    int64
	read    int64 // input bytes consumed
	total   int64 // input bytes in all; -1 unknown
	rate    float64
	elapsed time.Duration
	final   bool
}

// renderProgress returns the bar's line (without control characters), at
// most width columns wide:
//
//	jobs [=========>          ]  45%  12,345 msgs  8,123 msg/s  ETA 5s
//	jobs  12,345 msgs  8,123 msg/s  7s                    (size unknown)
func renderProgress(s progressState, width int) string {
	stats := fmt.Sprintf("%s msgs  %s msg/s", commas(s.msgs), commas(int64(s.rate+0.5)))
	var tail string
	switch {
	case s.final:
		tail = "done in " + shortDuration(s.elapsed)
	case s.total > 0 && s.read > 0 && s.read < s.total:
		eta := time.Duration(float64(s.elapsed) * float64(s.total-s.read) / float64(s.read))
		tail = "ETA " + shortDuration(eta)
	case s.total > 0:
		tail = ""
	default:
		tail = shortDuration(s.elapsed)
	}
	if s.total <= 0 {
		line := strings.TrimRight(s.label+"  "+stats+"  "+tail, " ")
		return clip(line, width)
	}
	frac := 1.0
	if s.read < s.total {
		frac = float64(s.read) / float64(s.total)
	}
	if s.final {
		frac = 1
	}
	pct := fmt.Sprintf("%3d%%", int(frac*100))
	rest := strings.TrimRight("  "+pct+"  "+stats+"  "+tail, " ")
	barWidth := width - len(s.label) - 3 - len(rest) - 1 // label, " [", "]", margin
	if barWidth < 10 {
		return clip(s.label+rest, width)
	}
	filled := int(frac * float64(barWidth))
	bar := strings.Repeat("=", filled)
	if filled < barWidth {
		bar += ">" + strings.Repeat(" ", barWidth-filled-1)
	}
	return s.label + " [" + bar + "]" + rest
}

func clip(s string, width int) string {
	if width > 1 && len(s) > width-1 {
		return strings.TrimRight(s[:width-1], " ")
	}
	return s
}

// commas formats n with thousands separators: 12,345.
func commas(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// shortDuration formats d as 5s, 1m05s, 2h03m, or 0.3s under a second.
func shortDuration(d time.Duration) string {
	switch {
	case d < time.Second:
		return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + "s"
	case d < time.Minute:
		return strconv.Itoa(int(d.Seconds())) + "s"
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	default:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
}
