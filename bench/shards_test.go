package bench

import (
	"errors"
	"testing"
)

// TestFlowAccounting checks the shards scenario's bookkeeping without
// Redis: a lost, a duplicated or an unknown message fails the check, and
// credits come back one per consumed batch, never more than were taken.
func TestFlowAccounting(t *testing.T) {
	const batch = 10
	newRun := func() (*flow, []uint64) {
		f := newFlow(batch, 3*batch)
		var seqs []uint64
		for i := 0; i < 3; i++ {
			<-f.credits
			base := f.issue()
			for j := 0; j < batch; j++ {
				seqs = append(seqs, base+uint64(j))
			}
		}
		if len(f.credits) != 0 {
			t.Fatalf("%d credits left after taking all 3", len(f.credits))
		}
		return f, seqs
	}

	f, seqs := newRun()
	f.settle(seqs[:15])
	if len(f.credits) != 1 {
		t.Errorf("15 of 30 consumed: %d credits back, want 1", len(f.credits))
	}
	f.settle(seqs[15:])
	if len(f.credits) != 3 {
		t.Errorf("all consumed: %d credits back, want 3", len(f.credits))
	}
	if err := f.check("all"); err != nil {
		t.Errorf("all consumed once: %v", err)
	}

	f, seqs = newRun()
	f.settle(seqs[1:])
	if err := f.check("one lost"); !errors.Is(err, ErrLost) {
		t.Errorf("one lost: %v, want ErrLost", err)
	}

	f, seqs = newRun()
	f.settle(seqs)
	f.settle(seqs[7:8])
	if err := f.check("one twice"); !errors.Is(err, ErrLost) {
		t.Errorf("one consumed twice: %v, want ErrLost", err)
	}
	if len(f.credits) != 3 {
		t.Errorf("a duplicate gave a credit: %d back, want 3", len(f.credits))
	}

	f, seqs = newRun()
	f.settle(append(seqs[1:], 1000))
	if err := f.check("unknown"); !errors.Is(err, ErrLost) {
		t.Errorf("one lost, one never sent: %v, want ErrLost", err)
	}
}
